"""The API: routes, request and response models, errors, versions and who may call what."""
