// A classic script that runs before the app's modules: if one of them fails to load or to parse,
// the page says so instead of staying blank. Once the app has started, its own handlers take over.
(function () {
  function fail(message) {
    if (window.__deeptrace && window.__deeptrace.started) return;
    var banner = document.getElementById("banner");
    if (!banner) return;
    banner.textContent = "The DeepTrace UI could not start: " + message;
    banner.hidden = false;
  }
  // Capture phase: a script that fails to load reports on its element, and that event does not bubble.
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t.tagName === "SCRIPT") fail("could not load " + t.src);
    else fail(e.message || "unknown error");
  }, true);
})();
