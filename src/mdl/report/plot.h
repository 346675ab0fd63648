// Figures for runs and reports, drawn with PLplot (Debian's libplplot) as SVG files: line plots (loss
// and metric curves), grouped bar charts (accuracy per method) and heatmaps (a task-by-skill routing
// allocation, expert load per layer). Each figure is written to a temporary name and renamed, so a
// reader never sees half a file. PLplot keeps global state; calls are serialised here.
#pragma once

#include <string>
#include <vector>

namespace mdl {

/// Titles and size shared by every figure.
struct PlotOptions {
  std::string title;
  std::string x_label, y_label;
  int width = 800, height = 500;  ///< points
  bool log_y = false;             ///< line plots: logarithmic y axis (every y must be > 0)
};

/// One named curve of a line plot.
struct Series {
  std::string name;
  std::vector<double> x, y;  ///< same length; non-finite points are skipped
};

/// Curves over a shared x axis, with a legend when there are several.
void write_line_plot(const std::string& path, const std::vector<Series>& series, const PlotOptions& options);

/// Grouped bars: one group per category, one bar per series in each group (values[s][c]).
void write_bar_plot(const std::string& path, const std::vector<std::string>& categories,
                    const std::vector<std::string>& series, const std::vector<std::vector<double>>& values,
                    const PlotOptions& options);

/// A heatmap of values[r][c] (white: lowest, dark blue: highest) with row and column labels and each
/// cell's value printed in it.
void write_heatmap(const std::string& path, const std::vector<std::string>& rows,
                   const std::vector<std::string>& cols, const std::vector<std::vector<double>>& values,
                   const PlotOptions& options);

}  // namespace mdl
