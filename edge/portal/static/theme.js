// Runs in <head>, before the page paints: the remembered theme, else the system's.
(function () {
  var saved = null;
  try { saved = localStorage.getItem("lwapi-theme"); } catch (e) { /* storage disabled: follow the system */ }
  var dark = saved ? saved === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.setAttribute("data-theme", dark ? "dark" : "light");
})();
