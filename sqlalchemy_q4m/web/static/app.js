// Live refresh without a build step: every few seconds the page is fetched again and its
// <main> swapped in (server-rendered and escaped: no user data is ever turned into HTML
// here).  Paused while a form is being used, and when "live" is unchecked.
(function () {
  "use strict";
  var seconds = parseFloat(document.body.dataset.refresh || "0");
  var box = document.getElementById("live");
  var busy = false;

  function using() {
    var active = document.activeElement;
    if (active && active.closest && active.closest("form") && active.tagName !== "BUTTON") return true;
    return document.querySelector("main input[type=checkbox]:checked") !== null;
  }

  function wire(root) {
    root.querySelectorAll("form.confirm").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
    root.querySelectorAll("button.confirm-button").forEach(function (button) {
      button.addEventListener("click", function (event) {
        if (!window.confirm(button.dataset.confirm)) event.preventDefault();
      });
    });
  }

  function refresh() {
    if (busy || !box || !box.checked || using() || document.hidden) return;
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Requested-With": "q4m-refresh" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html || using()) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main) {
          var flash = fresh.querySelector(".flash");
          if (flash) flash.remove();
          main.replaceWith(fresh);
          wire(fresh);
          document.body.dataset.refreshed = String(Date.now());
        }
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }

  wire(document);
  if (seconds > 0) window.setInterval(refresh, seconds * 1000);
})();
