#include "mdl/report/plot.h"

#include <plplot/plplot.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <mutex>

#include "mdl/core/error.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;

std::mutex& plplot_mutex() {
  static std::mutex m;
  return m;
}

// Tableau's ten categorical colours: distinguishable, also in grey print.
constexpr int kPalette[10][3] = {{31, 119, 180},  {255, 127, 14}, {44, 160, 44},   {214, 39, 40},
                                 {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127},
                                 {188, 189, 34},  {23, 190, 207}};
constexpr int kFirstSeriesColour = 2;  // 0: background, 1: axes and text

/// PLplot treats '#' as an escape; user text is shown as written.
std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == '#') out += '#';
  }
  return out;
}

bool has_svg_driver() {
  int n = 64;  // capacity in, count out
  std::vector<const char*> menus(64), devices(64);
  const char** m = menus.data();
  const char** d = devices.data();
  plgDevs(&m, &d, &n);
  for (PLINT i = 0; i < n; ++i)
    if (std::string(devices[static_cast<size_t>(i)]) == "svg") return true;
  return false;
}

/// One figure being drawn: a fresh PLplot stream writing SVG to a temporary file, renamed on finish().
/// Holds the PLplot lock for its lifetime (PLplot has global state).
class Figure {
 public:
  Figure(const std::string& path, const PlotOptions& o)
      : lock_(plplot_mutex()), path_(path), tmp_(path + ".tmp") {
    MDL_CHECK(fs::path(path).extension() == ".svg", "[plot] '", path,
              "': figures are written as SVG; name the file *.svg");
    MDL_CHECK(o.width > 0 && o.height > 0, "[plot] '", path, "': size must be positive, got ", o.width, "x",
              o.height);
    MDL_CHECK(has_svg_driver(),
              "[plot] PLplot has no svg driver; install Debian's libplplot17 (scripts/setup.sh does)");
    if (fs::path(path).has_parent_path()) fs::create_directories(fs::path(path).parent_path());
    PLINT stream = 0;
    plmkstrm(&stream);
    plsdev("svg");
    plsfnam(tmp_.c_str());
    plspage(0, 0, o.width, o.height, 0, 0);
    plscmap0n(16);
    plscol0(0, 255, 255, 255);
    plscol0(1, 0, 0, 0);
    for (int i = 0; i < 10; ++i)
      plscol0(kFirstSeriesColour + i, kPalette[i][0], kPalette[i][1], kPalette[i][2]);
    plinit();
    pladv(0);
    open_ = true;
  }
  ~Figure() {
    if (!open_) return;
    plend1();
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
  void finish() {
    plend1();
    open_ = false;
    MDL_CHECK(fs::exists(tmp_) && fs::file_size(tmp_) > 0, "[plot] PLplot wrote nothing to '", tmp_, "'");
    fs::rename(tmp_, path_);
  }

 private:
  std::lock_guard<std::mutex> lock_;
  std::string path_, tmp_;
  bool open_ = false;
};

void labels(const PlotOptions& o) {
  plcol0(1);
  pllab(escape(o.x_label).c_str(), escape(o.y_label).c_str(), escape(o.title).c_str());
}

}  // namespace

void write_line_plot(const std::string& path, const std::vector<Series>& series, const PlotOptions& o) {
  MDL_CHECK(!series.empty(), "[plot] '", path, "': no series to draw");
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  std::vector<std::vector<PLFLT>> xs(series.size()), ys(series.size());
  for (size_t s = 0; s < series.size(); ++s) {
    const Series& c = series[s];
    MDL_CHECK(c.x.size() == c.y.size(), "[plot] '", path, "': series '", c.name, "' has ", c.x.size(),
              " x values but ", c.y.size(), " y values");
    for (size_t i = 0; i < c.x.size(); ++i) {
      if (!std::isfinite(c.x[i]) || !std::isfinite(c.y[i])) continue;
      MDL_CHECK(!o.log_y || c.y[i] > 0, "[plot] '", path, "': series '", c.name, "' has y = ", c.y[i],
                " at x = ", c.x[i], ", which a logarithmic axis cannot show");
      const double y = o.log_y ? std::log10(c.y[i]) : c.y[i];
      xs[s].push_back(c.x[i]), ys[s].push_back(y);
      x0 = std::min(x0, c.x[i]), x1 = std::max(x1, c.x[i]), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
  }
  MDL_CHECK(std::isfinite(x0), "[plot] '", path, "': no finite points to draw");
  if (x1 == x0) x0 -= 0.5, x1 += 0.5;
  if (y1 == y0) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.05 * (y1 - y0);
  Figure fig(path, o);
  plvsta();
  plwind(x0, x1, y0 - pad, y1 + pad);
  plcol0(1);
  plbox("bcnst", 0, 0, o.log_y ? "bcnstvl" : "bcnstv", 0, 0);
  labels(o);
  plwidth(2);
  for (size_t s = 0; s < series.size(); ++s) {
    if (xs[s].empty()) continue;
    plcol0(kFirstSeriesColour + static_cast<int>(s % 10));
    if (xs[s].size() == 1)
      plpoin(1, xs[s].data(), ys[s].data(), 17);
    else
      plline(static_cast<PLINT>(xs[s].size()), xs[s].data(), ys[s].data());
  }
  plwidth(1);
  if (series.size() > 1) {
    const auto n = static_cast<PLINT>(series.size());
    std::vector<PLINT> opt(series.size(), PL_LEGEND_LINE), text_colours(series.size(), 1), line_colours,
        styles(series.size(), 1);
    std::vector<PLFLT> widths(series.size(), 2.0);
    std::vector<std::string> names;
    std::vector<const char*> text;
    for (size_t s = 0; s < series.size(); ++s) {
      line_colours.push_back(kFirstSeriesColour + static_cast<int>(s % 10));
      names.push_back(escape(series[s].name));
    }
    for (const auto& nm : names) text.push_back(nm.c_str());
    PLFLT w = 0, h = 0;
    pllegend(&w, &h, PL_LEGEND_BACKGROUND | PL_LEGEND_BOUNDING_BOX,
             PL_POSITION_TOP | PL_POSITION_RIGHT | PL_POSITION_INSIDE, 0.02, 0.02, 0.08, 0, 1, 1, 0, 0, n,
             opt.data(), 1.0, 0.8, 2.0, 0.0, text_colours.data(), text.data(), nullptr, nullptr, nullptr,
             nullptr, line_colours.data(), styles.data(), widths.data(), nullptr, nullptr, nullptr, nullptr);
  }
  fig.finish();
}

void write_bar_plot(const std::string& path, const std::vector<std::string>& categories,
                    const std::vector<std::string>& series, const std::vector<std::vector<double>>& values,
                    const PlotOptions& o) {
  MDL_CHECK(!categories.empty() && !series.empty(), "[plot] '", path,
            "': a bar plot needs categories and series");
  MDL_CHECK(values.size() == series.size(), "[plot] '", path, "': ", series.size(), " series but ",
            values.size(), " rows of values");
  double lo = 0, hi = 0;
  for (size_t s = 0; s < values.size(); ++s) {
    MDL_CHECK(values[s].size() == categories.size(), "[plot] '", path, "': series '", series[s], "' has ",
              values[s].size(), " values for ", categories.size(), " categories");
    for (double v : values[s])
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  if (hi == lo) hi = lo + 1;
  const auto C = static_cast<double>(categories.size()), S = static_cast<double>(series.size());
  Figure fig(path, o);
  plvpor(0.1, 0.95, 0.15, 0.9);
  plwind(0, C, lo, hi + 0.15 * (hi - lo));
  plcol0(1);
  plbox("bc", 0, 0, "bcnstv", 0, 0);
  labels(o);
  const double width = 0.8 / S;
  for (size_t c = 0; c < categories.size(); ++c) {
    for (size_t s = 0; s < series.size(); ++s) {
      const double v = values[s][c];
      if (!std::isfinite(v)) continue;
      const double left = static_cast<double>(c) + 0.1 + width * static_cast<double>(s);
      PLFLT x[4] = {left, left, left + width, left + width}, y[4] = {0, v, v, 0};
      plcol0(kFirstSeriesColour + static_cast<int>(s % 10));
      plfill(4, x, y);
      plcol0(1);
      char text[32];
      std::snprintf(text, sizeof(text), "%.3g", v);
      plschr(0, 0.6);
      plptex(left + width / 2, v + 0.02 * (hi - lo), 0, 0, 0.5, text);
      plschr(0, 1.0);
    }
    plcol0(1);
    plmtex("b", 1.5, (static_cast<double>(c) + 0.5) / C, 0.5, escape(categories[c]).c_str());
  }
  if (series.size() > 1) {
    const auto n = static_cast<PLINT>(series.size());
    std::vector<PLINT> opt(series.size(), PL_LEGEND_COLOR_BOX), text_colours(series.size(), 1), box_colours,
        patterns(series.size(), 0);
    std::vector<PLFLT> scales(series.size(), 0.8), widths(series.size(), 1.0);
    std::vector<std::string> names;
    std::vector<const char*> text;
    for (size_t s = 0; s < series.size(); ++s) {
      box_colours.push_back(kFirstSeriesColour + static_cast<int>(s % 10));
      names.push_back(escape(series[s]));
    }
    for (const auto& nm : names) text.push_back(nm.c_str());
    PLFLT w = 0, h = 0;
    pllegend(&w, &h, PL_LEGEND_BACKGROUND | PL_LEGEND_BOUNDING_BOX,
             PL_POSITION_TOP | PL_POSITION_RIGHT | PL_POSITION_INSIDE, 0.02, 0.02, 0.05, 0, 1, 1, 0, 0, n,
             opt.data(), 1.0, 0.8, 2.0, 0.0, text_colours.data(), text.data(), box_colours.data(),
             patterns.data(), scales.data(), widths.data(), nullptr, nullptr, nullptr, nullptr, nullptr,
             nullptr, nullptr);
  }
  fig.finish();
}

void write_heatmap(const std::string& path, const std::vector<std::string>& rows,
                   const std::vector<std::string>& cols, const std::vector<std::vector<double>>& values,
                   const PlotOptions& o) {
  MDL_CHECK(!rows.empty() && !cols.empty(), "[plot] '", path, "': a heatmap needs rows and columns");
  MDL_CHECK(values.size() == rows.size(), "[plot] '", path, "': ", rows.size(), " row labels but ",
            values.size(), " rows");
  double lo = INFINITY, hi = -INFINITY;
  for (size_t r = 0; r < rows.size(); ++r) {
    MDL_CHECK(values[r].size() == cols.size(), "[plot] '", path, "': row '", rows[r], "' has ",
              values[r].size(), " values for ", cols.size(), " columns");
    for (double v : values[r])
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  MDL_CHECK(std::isfinite(lo), "[plot] '", path, "': no finite values");
  if (hi == lo) hi = lo + 1;
  const auto R = static_cast<PLINT>(rows.size()), C = static_cast<PLINT>(cols.size());
  // plimage wants data[x][y] with y upwards; row 0 is drawn at the top.
  std::vector<std::vector<PLFLT>> grid(static_cast<size_t>(C), std::vector<PLFLT>(static_cast<size_t>(R)));
  std::vector<PLFLT*> columns;
  for (PLINT c = 0; c < C; ++c) {
    for (PLINT r = 0; r < R; ++r) {
      const double v = values[static_cast<size_t>(r)][static_cast<size_t>(c)];
      grid[static_cast<size_t>(c)][static_cast<size_t>(R - 1 - r)] = std::isfinite(v) ? v : lo;
    }
    columns.push_back(grid[static_cast<size_t>(c)].data());
  }
  Figure fig(path, o);
  // White (low) to dark blue (high).
  PLFLT pos[2] = {0, 1}, red[2] = {1, 0.03}, green[2] = {1, 0.19}, blue[2] = {1, 0.42};
  plscmap1l(1, 2, pos, red, green, blue, nullptr);
  plvpor(0.18, 0.95, 0.15, 0.88);
  plwind(0, C, 0, R);
  plimage(columns.data(), C, R, 0, C, 0, R, lo, hi, 0, C, 0, R);
  plcol0(1);
  plbox("bc", 0, 0, "bc", 0, 0);
  labels(o);
  plschr(0, 0.7);
  for (PLINT c = 0; c < C; ++c)
    plmtex("b", 1.2, (c + 0.5) / C, 0.5, escape(cols[static_cast<size_t>(c)]).c_str());
  for (PLINT r = 0; r < R; ++r) {
    plmtex("lv", 0.5, (R - r - 0.5) / R, 1.0, escape(rows[static_cast<size_t>(r)]).c_str());
    for (PLINT c = 0; c < C; ++c) {
      const double v = values[static_cast<size_t>(r)][static_cast<size_t>(c)];
      char text[32];
      std::snprintf(text, sizeof(text), "%.2f", v);
      plcol0((v - lo) / (hi - lo) > 0.55 ? 0 : 1);  // white text on dark cells
      plptex(c + 0.5, R - r - 0.6, 0, 0, 0.5, text);
    }
  }
  plschr(0, 1.0);
  fig.finish();
}

}  // namespace mdl
