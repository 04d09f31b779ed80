// Progressive enhancement only: every page works without it.
(function () {
  var root = document.documentElement;
  var toggle = document.getElementById("theme-toggle");
  function show() {
    var dark = root.getAttribute("data-theme") === "dark";
    if (toggle) { toggle.textContent = dark ? "🌙" : "☀️"; toggle.setAttribute("aria-pressed", dark ? "true" : "false"); }
  }
  if (toggle) {
    toggle.addEventListener("click", function () {
      var next = root.getAttribute("data-theme") === "dark" ? "light" : "dark";
      root.setAttribute("data-theme", next);
      try { localStorage.setItem("lwapi-theme", next); } catch (e) { /* not remembered, still switched */ }
      show();
    });
  }
  show();
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var source = document.getElementById(button.getAttribute("data-copy"));
      if (!source || !navigator.clipboard) { return; }
      navigator.clipboard.writeText(source.textContent.trim()).then(function () {
        var label = button.textContent;
        button.textContent = button.getAttribute("data-copied") || label;
        setTimeout(function () { button.textContent = label; }, 1500);
      });
    });
  });
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });
  document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
})();
