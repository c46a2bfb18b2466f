// Shared by both docs pages: the token from the address, a fetch that sends it, and the loader
// that runs the fetched assets inline (a script element's src cannot carry a header).
const tokenHeaders = {};
const token = new URLSearchParams(window.location.search).get("token");
if (token) tokenHeaders[%(header)s] = token;
async function fetchOk(url) {
  const response = await fetch(url, {headers: tokenHeaders, credentials: "omit"});
  if (!response.ok) throw new Error(url + " answered " + response.status + ": " + await response.text());
  return response;
}
async function load(names) {
  const fetched = names.map((name) => fetchOk(%(assets)s + "/" + name).then((r) => r.text()));
  const texts = await Promise.all(fetched);
  texts.forEach((text, i) => {
    const element = document.createElement(names[i].endsWith(".css") ? "style" : "script");
    element.textContent = text;
    document.head.append(element);
    if (element.tagName === "SCRIPT") element.remove();  // it has run
  });
  fetchOk(%(assets)s + "/favicon.png").then((r) => r.blob()).then((blob) => {
    const reader = new FileReader();
    reader.onload = () => {
      const icon = document.createElement("link");
      icon.rel = "icon";
      icon.href = reader.result;
      document.head.append(icon);
    };
    reader.readAsDataURL(blob);
  }).catch(() => {});
}
function failed(error) {
  const message = document.createElement("pre");
  message.textContent = "The API docs could not be loaded: " + error.message;
  document.body.replaceChildren(message);
}
