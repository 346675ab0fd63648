// Figures: each kind is written as a complete SVG with its labels, atomically (no temporary left), and
// bad input is refused with the file and the mismatch named.
#include "mdl/report/plot.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;

TEST(Plot, LinePlotWithLegend) {
  test::TempDir dir;
  const std::string path = dir / "curves/loss.svg";
  PlotOptions o;
  o.title = "Loss #1", o.x_label = "step", o.y_label = "loss";
  write_line_plot(path, {{"train", {0, 1, 2, 3}, {2.0, 1.5, 1.0, 0.8}}, {"eval", {1, 3}, {1.7, 1.1}}}, o);
  const std::string svg = test::read_file(path);
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_GE(std::count(svg.begin(), svg.end(), '\n'), 10);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  o.log_y = true;
  write_line_plot(dir / "log.svg", {{"ppl", {0, 1}, {400.0, 40.0}}}, o);
  EXPECT_TRUE(fs::exists(dir / "log.svg"));
}

TEST(Plot, BarsAndHeatmap) {
  test::TempDir dir;
  PlotOptions o;
  o.title = "Accuracy";
  write_bar_plot(dir / "bars.svg", {"digits", "fashion"}, {"LoRA", "full"}, {{0.9, 0.8}, {0.95, 0.85}}, o);
  EXPECT_NE(test::read_file(dir / "bars.svg").find("</svg>"), std::string::npos);
  o.title = "Task-skill allocation";
  write_heatmap(dir / "heat.svg", {"t0", "t1", "t2"}, {"s0", "s1"}, {{1, 0}, {0.5, 0.5}, {0, 1}}, o);
  const std::string svg = test::read_file(dir / "heat.svg");
  size_t cells = 0;
  for (size_t at = svg.find("<polygon"); at != std::string::npos; at = svg.find("<polygon", at + 1)) ++cells;
  EXPECT_EQ(cells, 6u) << "one filled cell per value";
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
}

TEST(Plot, BadInputIsRefusedWithTheMismatchNamed) {
  test::TempDir dir;
  PlotOptions o;
  EXPECT_THROW_WITH(write_line_plot(dir / "a.png", {{"x", {0}, {1}}}, o), "name the file *.svg");
  EXPECT_THROW_WITH(write_line_plot(dir / "a.svg", {{"x", {0, 1}, {1}}}, o),
                    "series 'x' has 2 x values but 1 y values");
  o.log_y = true;
  EXPECT_THROW_WITH(write_line_plot(dir / "a.svg", {{"x", {0, 1}, {1, 0}}}, o), "logarithmic axis");
  EXPECT_THROW_WITH(write_bar_plot(dir / "b.svg", {"a", "b"}, {"s"}, {{1}}, o),
                    "series 's' has 1 values for 2 categories");
  EXPECT_THROW_WITH(write_heatmap(dir / "h.svg", {"r"}, {"a", "b"}, {{1}}, o),
                    "row 'r' has 1 values for 2 columns");
  EXPECT_FALSE(fs::exists(dir / "a.svg"));
}

}  // namespace
}  // namespace mdl
