// Draws the usage charts from the numbers embedded in the page (the same as the table under them).
(function () {
  var source = document.getElementById("usage-data");
  if (!source || !window.Plotly) { return; }
  var charts = JSON.parse(source.textContent);
  var style = getComputedStyle(document.documentElement);
  var fg = style.getPropertyValue("--fg").trim(), line = style.getPropertyValue("--line").trim();
  document.querySelectorAll("[data-chart]").forEach(function (node) {
    var traces = (charts[node.getAttribute("data-chart")] || []).map(function (s) {
      return { type: "bar", name: s.name, x: s.x, y: s.y };
    });
    Plotly.newPlot(node, traces, {
      barmode: "stack", height: 300, margin: { l: 60, r: 10, t: 10, b: 40 },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)", font: { color: fg },
      xaxis: { type: "date", gridcolor: line }, yaxis: { gridcolor: line, rangemode: "tozero" },
      legend: { orientation: "h", y: -0.2 }
    }, { displayModeBar: false, responsive: true });
  });
})();
