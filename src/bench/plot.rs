//! The bench's pictures, drawn with `plotters` on its bitmap backend and written as PNG: speed
//! against fidelity per policy family, the skip map of every variant (blocks × steps), and the
//! first batch of samples per variant. Text is rasterised by `ab_glyph` from Noto Sans Regular,
//! embedded in the binary by the `ttf-noto-sans` crate (the font under the Apache License 2.0),
//! so nothing depends on system font libraries (fontconfig, freetype).
//!
//! [`write_figures`] draws every figure of a report from a few fields of each variant
//! ([`Plotted`]); [`redraw`] does the same from a report.json already written, for figures drawn
//! again without running the bench (the samples, absent from the JSON, are left as they are).

use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub type Rgb = [u8; 3];

pub const WHITE_RGB: Rgb = [255, 255, 255];

/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";

/// Registers the embedded font with plotters, once per process, before any text is drawn.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR).is_err()
        {
            panic!("the embedded Noto Sans font does not parse");
        }
    });
}

/// The same font, for its metrics.
fn metrics() -> &'static ab_glyph::FontRef<'static> {
    static FONT_REF: OnceLock<ab_glyph::FontRef<'static>> = OnceLock::new();
    FONT_REF.get_or_init(|| {
        ab_glyph::FontRef::try_from_slice(ttf_noto_sans::REGULAR)
            .expect("the embedded Noto Sans font parses")
    })
}

/// Each glyph of a line of text at `size` pixels: its character, where its pen starts, and how
/// far right of the pen its ink starts (the side bearing, whole pixels); and the line's width.
fn layout(text: &str, size: u32) -> (Vec<(char, f32, i32)>, f32) {
    use ab_glyph::{Font as _, ScaleFont as _};
    let font = metrics().as_scaled(size as f32);
    let mut glyphs = Vec::new();
    let mut pen = 0f32;
    let mut previous = None;
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(p) = previous {
            pen += font.kern(p, id);
        }
        let bearing = font
            .outline_glyph(id.with_scale(size as f32))
            .map_or(0, |g| g.px_bounds().min.x as i32);
        glyphs.push((c, pen, bearing));
        pen += font.h_advance(id);
        previous = Some(id);
    }
    (glyphs, pen)
}

/// The width in pixels of a line of text at `size` pixels.
pub fn text_width(text: &str, size: u32) -> u32 {
    layout(text, size).1.ceil() as u32
}

/// A line of text at `size` pixels (even: plotters halves it), anchored at `at` by `anchor`
/// (vertically by the font's ascent and descent), reading upwards when `up`.
///
/// Plotters rasterises each glyph from the registered font, one glyph a call: its own layout of
/// a line drops every glyph's side bearing, which runs letters together ("cl" reads "d").
fn text_at(
    area: &Area,
    text: &str,
    at: (i32, i32),
    size: u32,
    colour: RGBColor,
    anchor: (HPos, VPos),
    up: bool,
) -> anyhow::Result<()> {
    use ab_glyph::{Font as _, ScaleFont as _};
    let font = metrics().as_scaled(size as f32);
    let (glyphs, width) = layout(text, size);
    let along0 = match anchor.0 {
        HPos::Left => 0.0,
        HPos::Center => -width / 2.0,
        HPos::Right => -width,
    };
    // Plotters sets a glyph's baseline half its size below where it is put.
    let baseline = match anchor.1 {
        VPos::Top => font.ascent(),
        VPos::Center => (font.ascent() + font.descent()) / 2.0,
        VPos::Bottom => font.descent(),
    };
    let across = baseline.round() as i32 - (size / 2) as i32;
    let mut style = (FONT, size)
        .into_font()
        .color(&colour)
        .pos(Pos::new(HPos::Left, VPos::Top));
    if up {
        style = style.transform(FontTransform::Rotate270);
    }
    let mut buf = [0u8; 4];
    for (c, pen, bearing) in glyphs {
        if c.is_whitespace() {
            continue;
        }
        let along = (along0 + pen).round() as i32 + bearing;
        let pos = if up {
            (at.0 + across, at.1 - along)
        } else {
            (at.0 + along, at.1 + across)
        };
        drawn(area.draw(&Text::new(&*c.encode_utf8(&mut buf), pos, style.clone())))?;
    }
    Ok(())
}

/// [`text_at`], reading left to right.
fn text(
    area: &Area,
    text: &str,
    at: (i32, i32),
    size: u32,
    colour: RGBColor,
    anchor: (HPos, VPos),
) -> anyhow::Result<()> {
    text_at(area, text, at, size, colour, anchor, false)
}

const LEFT_TOP: (HPos, VPos) = (HPos::Left, VPos::Top);
const LEFT_CENTRE: (HPos, VPos) = (HPos::Left, VPos::Center);

fn rgb(colour: Rgb) -> RGBColor {
    RGBColor(colour[0], colour[1], colour[2])
}

/// A colour dark enough for text on white: light colours are scaled towards black.
fn text_colour(colour: Rgb) -> RGBColor {
    let luma = 0.299 * colour[0] as f64 + 0.587 * colour[1] as f64 + 0.114 * colour[2] as f64;
    let scale = if luma > 140.0 { 140.0 / luma } else { 1.0 };
    let c = |v: u8| (v as f64 * scale).round() as u8;
    RGBColor(c(colour[0]), c(colour[1]), c(colour[2]))
}

/// A colour per policy, stable across runs.
pub fn policy_colour(policy: &str) -> Rgb {
    match policy {
        "uncached" => [0, 0, 0],
        "steps" => [128, 128, 128],
        "fastcache" => [214, 39, 40],
        "fastcache-per-block" => [255, 152, 150],
        "fastcache-per-block-forecast" => [196, 96, 96],
        "fastcache-probe" => [120, 20, 30],
        "fbcache" => [31, 119, 180],
        "teacache" => [44, 160, 44],
        "interval" => [255, 127, 14],
        "merge" => [148, 103, 189],
        "merge+cache" => [140, 86, 75],
        "heun" => [23, 190, 207],
        "ab2" => [188, 189, 34],
        "dpmpp2m" => [227, 119, 194],
        _ => [60, 60, 60],
    }
}

/// A drawn picture: 8-bit RGB pixels, row by row.
pub struct Figure {
    pub width: u32,
    pub height: u32,
    pixels: Vec<u8>,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

impl Figure {
    /// A white picture of the given size, drawn on by `draw` through plotters' bitmap backend.
    fn draw(
        width: u32,
        height: u32,
        draw: impl FnOnce(&Area) -> anyhow::Result<()>,
    ) -> anyhow::Result<Figure> {
        register_font();
        let (width, height) = (width.max(1), height.max(1));
        let mut pixels = vec![255u8; width as usize * height as usize * 3];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
            draw(&root)?;
            root.present().context("cannot draw the figure")?;
        }
        Ok(Figure {
            width,
            height,
            pixels,
        })
    }

    pub fn get(&self, x: u32, y: u32) -> Rgb {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Writes the picture as an 8-bit RGB PNG.
    pub fn write_png(&self, writer: impl std::io::Write) -> anyhow::Result<()> {
        let mut encoder = png::Encoder::new(writer, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut png = encoder.write_header()?;
        png.write_image_data(&self.pixels)?;
        png.finish()?;
        Ok(())
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = std::io::BufWriter::new(file);
        self.write_png(&mut writer)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writer
            .flush()
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Plotters' errors carry the backend's, which is not `Send`-friendly for anyhow everywhere:
/// they are turned into messages.
fn drawn<T, E: std::fmt::Display>(result: Result<T, E>) -> anyhow::Result<T> {
    result.map_err(|e| anyhow::anyhow!("cannot draw the figure: {e}"))
}

/// A filled (or, from the sixth series on, hollow) marker centred on a pixel: circle, square,
/// triangle, diamond or downward triangle by index.
fn marker(area: &Area, (x, y): (i32, i32), index: usize, colour: RGBColor) -> anyhow::Result<()> {
    let style = if (index / 5).is_multiple_of(2) {
        colour.filled()
    } else {
        colour.stroke_width(2)
    };
    let r = 5;
    match index % 5 {
        0 => drawn(area.draw(&Circle::new((x, y), r, style))),
        1 => drawn(area.draw(&Rectangle::new(
            [(x - r + 1, y - r + 1), (x + r - 1, y + r - 1)],
            style,
        ))),
        shape => {
            let points = match shape {
                2 => vec![(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)],
                3 => vec![
                    (x, y - r - 1),
                    (x + r + 1, y),
                    (x, y + r + 1),
                    (x - r - 1, y),
                ],
                _ => vec![(x - r - 1, y - r), (x + r + 1, y - r), (x, y + r + 1)],
            };
            if style.filled {
                drawn(area.draw(&Polygon::new(points, style)))
            } else {
                let mut closed = points.clone();
                closed.push(points[0]);
                drawn(area.draw(&PathElement::new(closed, style)))
            }
        }
    }
}

/// One point of a scatter series.
#[derive(Clone, Debug)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// A policy's points, drawn in its colour and joined in order of x (the family's front).
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub colour: Rgb,
    pub points: Vec<Point>,
}

/// A scatter panel: axes with ticks and titles, each series joined by a line, labels beside the
/// points, a legend, and an optional dashed reference level (e.g. the uncached run's value).
pub struct Scatter<'a> {
    pub title: &'a str,
    pub x_title: &'a str,
    pub y_title: &'a str,
    pub series: &'a [Series],
    pub reference: Option<(f64, String)>,
    /// Which way the y axis improves, for the Pareto front over every family's points.
    pub higher_is_better: bool,
}

/// The points no other point beats on both speed and fidelity (at least as fast and at least as
/// good, better in one), in order of x: the best any policy reaches at each speed.
pub fn pareto_front(points: &[(f64, f64)], higher_is_better: bool) -> Vec<(f64, f64)> {
    let better = |a: f64, b: f64| if higher_is_better { a > b } else { a < b };
    let mut sorted: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    // Fastest first; among equal speeds the best first, so the others are dominated by it.
    sorted.sort_by(|a, b| {
        b.0.total_cmp(&a.0).then_with(|| match higher_is_better {
            true => b.1.total_cmp(&a.1),
            false => a.1.total_cmp(&b.1),
        })
    });
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in sorted {
        if front.last().is_none_or(|last| better(p.1, last.1)) {
            front.push(p);
        }
    }
    front.reverse();
    front
}

pub const PANEL_W: u32 = 900;
pub const PANEL_H: u32 = 540;
/// The legend's column, right of the plot.
const LEGEND_W: u32 = 230;

/// A range covering the values with a margin; one unit wide around a single value.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = (hi - lo) * 0.08;
        (lo - pad, hi + pad)
    }
}

/// Pixel rectangles [x0, y0, x1, y1] overlap.
fn overlap(a: [i32; 4], b: [i32; 4]) -> i64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0) as i64;
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0) as i64;
    w * h
}

/// Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
pub fn ticks(lo: f64, hi: f64, wanted: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / wanted.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut t = first;
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// A tick label with no more digits than the step needs.
pub fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{value:.decimals$}")
}

impl Scatter<'_> {
    /// Draws the panel with its top at `top` of the picture, PANEL_W × PANEL_H pixels.
    fn draw(&self, root: &Area, top: u32) -> anyhow::Result<()> {
        let finite = |p: &&Point| p.x.is_finite() && p.y.is_finite();
        let points = || self.series.iter().flat_map(|s| &s.points).filter(finite);
        let (x_lo, x_hi) = padded_range(points().map(|p| p.x).chain([1.0]));
        let (y_lo, y_hi) = padded_range(
            points()
                .map(|p| p.y)
                .chain(self.reference.as_ref().map(|r| r.0)),
        );
        let area = root.clone().shrink((0, top), (PANEL_W - LEGEND_W, PANEL_H));
        let mut chart = drawn(
            ChartBuilder::on(&area)
                .margin_top(44)
                .margin_left(10)
                .margin_right(16)
                .margin_bottom(6)
                .x_label_area_size(52)
                .y_label_area_size(76)
                .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi),
        )?;
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let (left, right, top_px, bottom) = (xs.start, xs.end - 1, ys.start, ys.end - 1);
        let ink = RGBColor(0, 0, 0);
        let grey = RGBColor(110, 110, 110);
        let grid = RGBColor(225, 225, 225);
        text(
            root,
            self.title,
            ((left + right) / 2, top as i32 + 12),
            18,
            ink,
            (HPos::Center, VPos::Top),
        )?;
        // The grid, the ticks and their labels, the axes and their titles.
        let x_ticks = ticks(x_lo, x_hi, 8);
        let x_step = x_ticks.get(1).map_or(1.0, |b| b - x_ticks[0]);
        for &t in &x_ticks {
            let x = chart.backend_coord(&(t, y_lo)).0;
            drawn(root.draw(&PathElement::new(vec![(x, top_px), (x, bottom)], grid)))?;
            drawn(root.draw(&PathElement::new(vec![(x, bottom), (x, bottom + 5)], ink)))?;
            let label = format!("{}x", tick_label(t, x_step));
            text(
                root,
                &label,
                (x, bottom + 9),
                14,
                ink,
                (HPos::Center, VPos::Top),
            )?;
        }
        let y_ticks = ticks(y_lo, y_hi, 8);
        let y_step = y_ticks.get(1).map_or(1.0, |b| b - y_ticks[0]);
        for &t in &y_ticks {
            let y = chart.backend_coord(&(x_lo, t)).1;
            drawn(root.draw(&PathElement::new(vec![(left, y), (right, y)], grid)))?;
            drawn(root.draw(&PathElement::new(vec![(left - 5, y), (left, y)], ink)))?;
            let label = tick_label(t, y_step);
            text(
                root,
                &label,
                (left - 9, y),
                14,
                ink,
                (HPos::Right, VPos::Center),
            )?;
        }
        drawn(root.draw(&PathElement::new(
            vec![(left, top_px), (left, bottom), (right, bottom)],
            ink,
        )))?;
        text(
            root,
            self.x_title,
            ((left + right) / 2, bottom + 32),
            16,
            ink,
            (HPos::Center, VPos::Top),
        )?;
        text_at(
            root,
            self.y_title,
            (left - 70, (top_px + bottom) / 2),
            16,
            ink,
            (HPos::Center, VPos::Top),
            true,
        )?;
        let mut taken: Vec<[i32; 4]> = Vec::new();
        if let Some((level, label)) = &self.reference {
            drawn(chart.draw_series(DashedLineSeries::new(
                [(x_lo, *level), (x_hi, *level)],
                6,
                4,
                grey.stroke_width(1),
            )))?;
            let y = chart.backend_coord(&(x_lo, *level)).1;
            text(
                root,
                label,
                (left + 6, y - 3),
                12,
                grey,
                (HPos::Left, VPos::Bottom),
            )?;
            let w = text_width(label, 12) as i32;
            taken.push([left + 6, y - 15, left + 6 + w, y - 3]);
        }
        // The Pareto front over every family, under the families' own lines.
        let all: Vec<(f64, f64)> = points().map(|p| (p.x, p.y)).collect();
        let front = pareto_front(&all, self.higher_is_better);
        if front.len() > 1 {
            drawn(chart.draw_series(DashedLineSeries::new(
                front.iter().copied(),
                8,
                5,
                ink.stroke_width(3),
            )))?;
        }
        // Each family's front: its points joined in order of speed; markers over the lines, and
        // labels where they collide least with markers and labels already placed.
        let mut fronts: Vec<Vec<&Point>> = Vec::new();
        for series in self.series {
            let mut pts: Vec<&Point> = series.points.iter().filter(finite).collect();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            drawn(chart.draw_series(LineSeries::new(
                pts.iter().map(|p| (p.x, p.y)),
                rgb(series.colour).stroke_width(2),
            )))?;
            fronts.push(pts);
        }
        for (i, (series, pts)) in self.series.iter().zip(&fronts).enumerate() {
            for p in pts {
                let (x, y) = chart.backend_coord(&(p.x, p.y));
                marker(root, (x, y), i, rgb(series.colour))?;
                taken.push([x - 6, y - 6, x + 6, y + 6]);
            }
            // The lines too, as a trail of small boxes, so that labels keep off them.
            for pair in pts.windows(2) {
                let (a, b) = (
                    chart.backend_coord(&(pair[0].x, pair[0].y)),
                    chart.backend_coord(&(pair[1].x, pair[1].y)),
                );
                let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) / 4).max(1);
                for k in 0..=n {
                    let x = a.0 + (b.0 - a.0) * k / n;
                    let y = a.1 + (b.1 - a.1) * k / n;
                    taken.push([x - 2, y - 2, x + 2, y + 2]);
                }
            }
        }
        let size = 12;
        for (series, pts) in self.series.iter().zip(&fronts) {
            for p in pts.iter().filter(|p| !p.label.is_empty()) {
                let (x, y) = chart.backend_coord(&(p.x, p.y));
                let (w, h) = (text_width(&p.label, size) as i32, size as i32);
                let candidates = [
                    (x + 7, y - h - 2),
                    (x + 7, y + 2),
                    (x - 7 - w, y - h - 2),
                    (x - 7 - w, y + 2),
                    (x - w / 2, y - h - 7),
                    (x - w / 2, y + 7),
                    (x + 9, y - h / 2),
                    (x - 9 - w, y - h / 2),
                ];
                let cost = |&(lx, ly): &(i32, i32)| {
                    let rect = [lx, ly, lx + w, ly + h];
                    let outside = lx < left || ly < top_px || lx + w > right || ly + h > bottom;
                    i64::from(outside) * 1_000_000
                        + taken.iter().map(|t| overlap(*t, rect)).sum::<i64>()
                };
                let (lx, ly) = candidates
                    .iter()
                    .copied()
                    .min_by_key(cost)
                    .unwrap_or(candidates[0]);
                taken.push([lx, ly, lx + w, ly + h]);
                text(
                    root,
                    &p.label,
                    (lx, ly),
                    size,
                    text_colour(series.colour),
                    LEFT_TOP,
                )?;
            }
        }
        // The legend, right of the plot: each family's marker on a stroke of its line, and its
        // name.
        let x0 = (PANEL_W - LEGEND_W) as i32 + 4;
        let y0 = top_px + 4;
        text(root, "family", (x0, y0), 14, grey, LEFT_TOP)?;
        for (i, series) in self.series.iter().enumerate() {
            let y = y0 + 30 + i as i32 * 22;
            let colour = rgb(series.colour);
            drawn(root.draw(&PathElement::new(
                vec![(x0, y), (x0 + 28, y)],
                colour.stroke_width(2),
            )))?;
            marker(root, (x0 + 14, y), i, colour)?;
            text(root, &series.name, (x0 + 38, y), 14, ink, LEFT_CENTRE)?;
        }
        let y = y0 + 30 + self.series.len() as i32 * 22 + 6;
        drawn(root.draw(&PathElement::new(
            vec![(x0, y), (x0 + 10, y)],
            ink.stroke_width(3),
        )))?;
        drawn(root.draw(&PathElement::new(
            vec![(x0 + 16, y), (x0 + 28, y)],
            ink.stroke_width(3),
        )))?;
        text(
            root,
            "Pareto front, all",
            (x0 + 38, y),
            14,
            ink,
            LEFT_CENTRE,
        )?;
        Ok(())
    }
}

/// Scatter panels stacked vertically in one picture, PANEL_W × PANEL_H each.
pub fn scatter_figure(panels: &[Scatter]) -> anyhow::Result<Figure> {
    let n = panels.len().max(1) as u32;
    Figure::draw(PANEL_W, PANEL_H * n, |root| {
        for (i, panel) in panels.iter().enumerate() {
            panel.draw(root, i as u32 * PANEL_H)?;
        }
        Ok(())
    })
}

/// One variant's skip map: `map[step][block]` is how often (over the runs of the variant) the
/// block was skipped at the step, 0 = always computed, 1 = always skipped.
pub struct SkipMap<'a> {
    pub title: String,
    pub map: &'a [Vec<f64>],
}

/// Where the skip-map figure puts things, in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SkipMapLayout {
    pub steps: usize,
    pub blocks: usize,
    pub cell_w: u32,
    pub cell_h: u32,
    pub width: u32,
    pub height: u32,
}

const SKIP_LEFT: u32 = 64;
const SKIP_HEADING: u32 = 84;
const SKIP_TITLE: u32 = 24;
const SKIP_AXIS: u32 = 26;

impl SkipMapLayout {
    pub fn new(maps: &[SkipMap]) -> SkipMapLayout {
        let steps = maps.iter().map(|m| m.map.len()).max().unwrap_or(1).max(1);
        let blocks = maps
            .iter()
            .flat_map(|m| m.map.iter().map(Vec::len))
            .max()
            .unwrap_or(1)
            .max(1);
        let cell_w = (720 / steps).clamp(4, 24) as u32;
        let cell_h = (120 / blocks).clamp(8, 18) as u32;
        let width = (SKIP_LEFT + steps as u32 * cell_w + 48).max(760);
        let height = SKIP_HEADING + maps.len().max(1) as u32 * Self::panel_h(blocks, cell_h) + 8;
        SkipMapLayout {
            steps,
            blocks,
            cell_w,
            cell_h,
            width,
            height,
        }
    }

    fn panel_h(blocks: usize, cell_h: u32) -> u32 {
        SKIP_TITLE + blocks as u32 * cell_h + SKIP_AXIS
    }

    /// The top of panel `panel`'s grid of cells.
    fn grid_top(&self, panel: usize) -> u32 {
        SKIP_HEADING + panel as u32 * Self::panel_h(self.blocks, self.cell_h) + SKIP_TITLE
    }

    /// The pixel rectangle [x0, y0, x1, y1] (inclusive) of a cell: steps along x, block 0 at
    /// the top.
    pub fn cell(&self, panel: usize, step: usize, block: usize) -> [u32; 4] {
        let x0 = SKIP_LEFT + step as u32 * self.cell_w;
        let y0 = self.grid_top(panel) + block as u32 * self.cell_h;
        [
            x0,
            y0,
            x0 + self.cell_w.saturating_sub(2),
            y0 + self.cell_h.saturating_sub(2),
        ]
    }
}

/// The shade of a skip share: white for never skipped, near black for always.
pub fn skip_shade(value: f64) -> Rgb {
    let v = (255.0 - 225.0 * value.clamp(0.0, 1.0)).round() as u8;
    [v, v, v]
}

/// Skip maps stacked vertically, a panel per variant, titled: steps along x, blocks along y
/// (block 0 at the top), each cell shaded by how often the block was skipped at the step.
pub fn skip_map_figure(maps: &[SkipMap]) -> anyhow::Result<Figure> {
    let layout = SkipMapLayout::new(maps);
    Figure::draw(layout.width, layout.height, |root| {
        let ink = RGBColor(0, 0, 0);
        let grey = RGBColor(100, 100, 100);
        text(
            root,
            "skip maps: x = step, y = block (0 at the top); shade = share of runs that skipped it",
            (10, 10),
            16,
            ink,
            LEFT_TOP,
        )?;
        // A key of the shades.
        let (kx, ky) = (10, 38);
        text(root, "computed", (kx, ky + 7), 12, grey, LEFT_CENTRE)?;
        let key_x = kx + text_width("computed", 12) as i32 + 8;
        for i in 0..=10 {
            let x = key_x + i * 14;
            let corners = [(x, ky), (x + 12, ky + 13)];
            drawn(root.draw(&Rectangle::new(
                corners,
                rgb(skip_shade(i as f64 / 10.0)).filled(),
            )))?;
            drawn(root.draw(&Rectangle::new(corners, grey)))?;
        }
        text(
            root,
            "skipped in every run",
            (key_x + 11 * 14 + 6, ky + 7),
            12,
            grey,
            LEFT_CENTRE,
        )?;
        let label_every = 14u32.div_ceil(layout.cell_h) as usize;
        for (panel, m) in maps.iter().enumerate() {
            let top = layout.grid_top(panel) as i32;
            text(
                root,
                &m.title,
                (10, top - 5),
                14,
                ink,
                (HPos::Left, VPos::Bottom),
            )?;
            for (step, row) in m.map.iter().enumerate() {
                for (block, &v) in row.iter().enumerate() {
                    let [x0, y0, x1, y1] = layout.cell(panel, step, block);
                    drawn(root.draw(&Rectangle::new(
                        [(x0 as i32, y0 as i32), (x1 as i32, y1 as i32)],
                        rgb(skip_shade(v)).filled(),
                    )))?;
                }
            }
            // A frame, the blocks' numbers and the steps' (the first and every tenth).
            let left = SKIP_LEFT as i32;
            let w = (m.map.len() as u32 * layout.cell_w) as i32;
            let h = (layout.blocks as u32 * layout.cell_h) as i32;
            drawn(root.draw(&Rectangle::new(
                [(left - 2, top - 2), (left + w, top + h)],
                grey,
            )))?;
            for block in (0..layout.blocks).step_by(label_every) {
                let y = top + (block as u32 * layout.cell_h + layout.cell_h / 2) as i32;
                text(
                    root,
                    &block.to_string(),
                    (left - 7, y),
                    12,
                    grey,
                    (HPos::Right, VPos::Center),
                )?;
            }
            text_at(
                root,
                "block",
                (12, top + h / 2),
                12,
                grey,
                (HPos::Center, VPos::Top),
                true,
            )?;
            for step in std::iter::once(1).chain((10..=m.map.len()).step_by(10)) {
                let x = left + ((step as u32 - 1) * layout.cell_w + layout.cell_w / 2) as i32;
                drawn(root.draw(&PathElement::new(
                    vec![(x, top + h), (x, top + h + 4)],
                    grey,
                )))?;
                text(
                    root,
                    &step.to_string(),
                    (x, top + h + 5),
                    12,
                    grey,
                    (HPos::Center, VPos::Top),
                )?;
            }
            text(
                root,
                "step",
                (left + w + 8, top + h + 5),
                12,
                grey,
                LEFT_TOP,
            )?;
        }
        Ok(())
    })
}

/// Rows of sample images [B, C, H, W] in [−1, 1] (1 or 3 channels), up to `per_row` per row,
/// each row titled on its left, images scaled up by `zoom`.
pub fn samples_figure(
    rows: &[(String, ndarray::ArrayView4<f32>)],
    per_row: usize,
    zoom: usize,
) -> anyhow::Result<Figure> {
    let (h, w) = rows
        .first()
        .map_or((1, 1), |(_, a)| (a.shape()[2], a.shape()[3]));
    let label_w = rows
        .iter()
        .map(|(t, _)| text_width(t, 14))
        .max()
        .unwrap_or(0)
        + 20;
    let cell = |n: usize| (n * zoom + 4) as u32;
    let width = (label_w + per_row as u32 * cell(w) + 4).max(text_width(SAMPLES_HEADING, 14) + 16);
    let height = SAMPLES_HEADER + rows.len() as u32 * cell(h) + 4;
    Figure::draw(width, height, |root| {
        text(
            root,
            SAMPLES_HEADING,
            (8, 8),
            14,
            RGBColor(90, 90, 90),
            LEFT_TOP,
        )?;
        for (r, (title, images)) in rows.iter().enumerate() {
            let oy = SAMPLES_HEADER + r as u32 * cell(h);
            let middle = (oy + cell(h) / 2) as i32;
            text(root, title, (8, middle), 14, RGBColor(0, 0, 0), LEFT_CENTRE)?;
            let channels = images.shape()[1];
            for b in 0..images.shape()[0].min(per_row) {
                let ox = label_w + b as u32 * cell(w);
                for y in 0..h * zoom {
                    for x in 0..w * zoom {
                        let value = |c: usize| {
                            let v = images[[b, c, y / zoom, x / zoom]];
                            ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                        };
                        let colour = if channels >= 3 {
                            RGBColor(value(0), value(1), value(2))
                        } else {
                            let g = value(0);
                            RGBColor(g, g, g)
                        };
                        let at = ((ox as usize + x) as i32, (oy as usize + y) as i32);
                        drawn(root.draw_pixel(at, &colour))?;
                    }
                }
            }
        }
        Ok(())
    })
}

/// The band above the sample rows, for the figure's heading.
const SAMPLES_HEADER: u32 = 30;
const SAMPLES_HEADING: &str = "first batch of each variant (the same seeds in every row)";

/// What the figures need of a variant.
#[derive(Clone, Debug)]
pub struct Plotted {
    pub id: String,
    pub policy: String,
    /// Samples the original model (no skip map to draw).
    pub original: bool,
    pub speedup: f64,
    pub psnr_mean: f64,
    pub fd: Option<f64>,
    pub skip_rate: f64,
    pub skip_map: Vec<Vec<f64>>,
}

impl From<&super::report::VariantReport> for Plotted {
    fn from(v: &super::report::VariantReport) -> Plotted {
        Plotted {
            id: v.id.clone(),
            policy: v.policy.clone(),
            original: v.is_original_model(),
            speedup: v.speedup,
            psnr_mean: v.psnr_mean,
            fd: v.fd,
            skip_rate: v.skip_rate,
            skip_map: v.skip_map.clone(),
        }
    }
}

/// The policy families among the variants, in their order, the uncached reference left out.
fn families(variants: &[Plotted]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for v in variants {
        if v.policy != "uncached" && !out.contains(&v.policy.as_str()) {
            out.push(&v.policy);
        }
    }
    out
}

/// Writes speed_vs_fidelity.png (PSNR, and with a classifier the Fréchet distance, against the
/// measured speedup), skip_maps.png (where some variant rewrites the model) and, given rows of
/// samples, samples.png into `dir`. Returns the files written.
pub fn write_figures(
    dir: &Path,
    variants: &[Plotted],
    with_classifier: bool,
    samples: &[(String, ndarray::ArrayView4<f32>)],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let series = |value: &dyn Fn(&Plotted) -> Option<f64>| -> Vec<Series> {
        families(variants)
            .iter()
            .map(|p| Series {
                name: p.to_string(),
                colour: policy_colour(p),
                points: variants
                    .iter()
                    .filter(|v| v.policy == *p)
                    .filter_map(|v| {
                        value(v).map(|y| Point {
                            x: v.speedup,
                            y,
                            label: v
                                .id
                                .rsplit_once('-')
                                .map_or(v.id.clone(), |(_, s)| s.to_string()),
                        })
                    })
                    .collect(),
            })
            .collect()
    };
    let psnr = series(&|v| v.psnr_mean.is_finite().then_some(v.psnr_mean));
    let fd = series(&|v| v.fd);
    let uncached_fd = variants
        .iter()
        .find(|v| v.policy == "uncached")
        .and_then(|v| v.fd);
    let mut panels = vec![Scatter {
        title: "PSNR against the uncached run vs measured speedup",
        x_title: "speedup (measured)",
        y_title: "PSNR dB (higher is closer)",
        series: &psnr,
        reference: None,
        higher_is_better: true,
    }];
    if with_classifier {
        panels.push(Scatter {
            title: "Fréchet distance (classifier features) vs measured speedup",
            x_title: "speedup (measured)",
            y_title: "FD (lower is better)",
            series: &fd,
            reference: uncached_fd.map(|f| (f, format!("uncached {f:.2}"))),
            higher_is_better: false,
        });
    }
    let figure = dir.join("speed_vs_fidelity.png");
    scatter_figure(&panels)?.save(&figure)?;
    written.push(figure);

    let maps: Vec<SkipMap> = variants
        .iter()
        .filter(|v| !v.original)
        .map(|v| SkipMap {
            title: format!("{}   skip rate {:.0}%", v.id, 100.0 * v.skip_rate),
            map: &v.skip_map,
        })
        .collect();
    if !maps.is_empty() {
        let figure = dir.join("skip_maps.png");
        skip_map_figure(&maps)?.save(&figure)?;
        written.push(figure);
    }
    if !samples.is_empty() {
        let figure = dir.join("samples.png");
        samples_figure(samples, 10, 2)?.save(&figure)?;
        written.push(figure);
    }
    Ok(written)
}

/// A number of report.json: a float, or "inf", "-inf", "nan" for the ones JSON lacks.
fn json_number(value: &serde_json::Value) -> Option<f64> {
    match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => match s.as_str() {
            "inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            "nan" => Some(f64::NAN),
            _ => None,
        },
        _ => None,
    }
}

/// Draws the speed and skip-map figures of `dir` again from its report.json (samples.png, made
/// from images the JSON does not hold, is left as it is). Returns the files written.
pub fn redraw(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let path = dir.join("report.json");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let report: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let variants = report["variants"]
        .as_array()
        .with_context(|| format!("{} has no variants", path.display()))?;
    let plotted = variants
        .iter()
        .map(|v| {
            let text = |key: &str| {
                v[key]
                    .as_str()
                    .map(String::from)
                    .with_context(|| format!("a variant of {} lacks {key}", path.display()))
            };
            let number = |key: &str| {
                json_number(&v[key])
                    .with_context(|| format!("a variant of {} lacks {key}", path.display()))
            };
            let policy = text("policy")?;
            Ok(Plotted {
                id: text("id")?,
                original: super::report::is_original_policy(&policy),
                policy,
                speedup: number("speedup")?,
                psnr_mean: number("psnr_mean")?,
                fd: json_number(&v["fd"]),
                skip_rate: number("skip_rate")?,
                skip_map: serde_json::from_value(v["skip_map"].clone())
                    .with_context(|| format!("a skip map of {} is malformed", path.display()))?,
            })
        })
        .collect::<anyhow::Result<Vec<Plotted>>>()?;
    write_figures(dir, &plotted, !report["classifier"].is_null(), &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (u32, u32, png::ColorType) {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info.width, info.height, info.color_type)
    }

    fn dark(c: Rgb) -> bool {
        c.iter().all(|&v| v < 60)
    }

    #[test]
    fn the_pareto_front_keeps_the_points_nothing_beats() {
        let points = [
            (1.0, 40.0),
            (2.0, 45.0),
            (2.0, 30.0),
            (3.0, 35.0),
            (4.0, 36.0),
            (5.0, 20.0),
        ];
        // Higher is better: (1, 40) is beaten by (2, 45), (3, 35) by (4, 36).
        assert_eq!(
            pareto_front(&points, true),
            [(2.0, 45.0), (4.0, 36.0), (5.0, 20.0)]
        );
        // Lower is better: the fastest point is lowest of all here, so it alone is left...
        assert_eq!(pareto_front(&points, false), [(5.0, 20.0)]);
        // ...and otherwise each point lower than every faster one.
        let fd = [(1.0, 10.0), (2.0, 12.0), (3.0, 11.0), (4.0, 15.0)];
        assert_eq!(
            pareto_front(&fd, false),
            [(1.0, 10.0), (3.0, 11.0), (4.0, 15.0)]
        );
        assert!(pareto_front(&[(f64::NAN, 1.0)], true).is_empty());
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(0.93, 3.4, 6);
        assert_eq!(t, vec![1.0, 1.5, 2.0, 2.5, 3.0]);
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(20.0, 5.0), "20");
    }

    #[test]
    fn a_skip_map_shades_cells_by_value() {
        let map = vec![vec![0.0, 1.0, 0.5], vec![1.0, 0.0, 0.25]];
        let maps = [
            SkipMap {
                title: "a".into(),
                map: &map,
            },
            SkipMap {
                title: "b".into(),
                map: &map[..1],
            },
        ];
        let figure = skip_map_figure(&maps).unwrap();
        let layout = SkipMapLayout::new(&maps);
        assert_eq!((figure.width, figure.height), (layout.width, layout.height));
        assert_eq!((layout.steps, layout.blocks), (2, 3));
        let centre = |panel, step, block| {
            let [x0, y0, x1, y1] = layout.cell(panel, step, block);
            figure.get((x0 + x1) / 2, (y0 + y1) / 2)
        };
        for panel in 0..2 {
            assert_eq!(centre(panel, 0, 0), WHITE_RGB);
            assert!(dark(centre(panel, 0, 1)), "{:?}", centre(panel, 0, 1));
            assert_eq!(centre(panel, 0, 2), skip_shade(0.5));
        }
        assert!(dark(centre(0, 1, 0)));
        assert_eq!(centre(0, 1, 1), WHITE_RGB);
        assert_eq!(centre(0, 1, 2), skip_shade(0.25));
        // Panel b has one step: its second column stays blank.
        assert_eq!(centre(1, 1, 0), WHITE_RGB);
        // Half-skipped is visibly between the two.
        let half = skip_shade(0.5)[0];
        assert!(60 < half && half < 200, "{half}");
    }

    #[test]
    fn a_scatter_figure_has_a_panel_per_plot_and_draws_the_series() {
        let series = [
            Series {
                name: "fastcache".into(),
                colour: policy_colour("fastcache"),
                points: vec![
                    Point {
                        x: 1.8,
                        y: 60.0,
                        label: "s1.8".into(),
                    },
                    Point {
                        x: 4.8,
                        y: 41.0,
                        label: "s5".into(),
                    },
                ],
            },
            Series {
                name: "steps".into(),
                colour: policy_colour("steps"),
                points: vec![Point {
                    x: f64::NAN,
                    y: 1.0,
                    label: "skipped".into(),
                }],
            },
        ];
        let panel = |title| Scatter {
            title,
            x_title: "x",
            y_title: "y",
            series: &series,
            reference: Some((50.0, "ref".into())),
            higher_is_better: true,
        };
        let figure = scatter_figure(&[panel("one"), panel("two")]).unwrap();
        assert_eq!((figure.width, figure.height), (PANEL_W, 2 * PANEL_H));
        let red = rgb(policy_colour("fastcache"));
        let count = |y0: u32, y1: u32| {
            (y0..y1)
                .flat_map(|y| (0..PANEL_W).map(move |x| (x, y)))
                .filter(|&(x, y)| figure.get(x, y) == [red.0, red.1, red.2])
                .count()
        };
        // Markers, the line between them and the legend's stroke, in both panels.
        assert!(count(0, PANEL_H) > 300, "{}", count(0, PANEL_H));
        assert!(count(PANEL_H, 2 * PANEL_H) > 300);
        // Text is drawn: the captions put dark pixels in the top band.
        let ink = (0..40)
            .flat_map(|y| (0..PANEL_W).map(move |x| (x, y)))
            .filter(|&(x, y)| dark(figure.get(x, y)))
            .count();
        assert!(ink > 20, "{ink}");
    }

    #[test]
    fn the_samples_figure_scales_the_images() {
        let mut images = ndarray::Array4::<f32>::zeros((3, 1, 4, 5));
        images[[0, 0, 0, 0]] = 1.0;
        images[[1, 0, 0, 0]] = -1.0;
        let figure = samples_figure(&[("row".into(), images.view())], 2, 3).unwrap();
        // Two images of 5×3 by 4×3 pixels, 4 apart, right of the title.
        let cell_w = 5 * 3 + 4;
        let left = text_width("row", 14) + 20;
        assert_eq!(
            figure.width,
            (left + 2 * cell_w + 4).max(text_width(SAMPLES_HEADING, 14) + 16)
        );
        assert_eq!(figure.height - SAMPLES_HEADER - 4, 4 * 3 + 4);
        assert_eq!(figure.get(left, SAMPLES_HEADER), WHITE_RGB);
        assert_eq!(figure.get(left + 2, SAMPLES_HEADER + 2), WHITE_RGB);
        assert_eq!(figure.get(left + 4, SAMPLES_HEADER), [128, 128, 128]);
        assert_eq!(figure.get(left + cell_w, SAMPLES_HEADER), [0, 0, 0]);
    }

    #[test]
    fn redraw_draws_the_figures_from_report_json() {
        let dir = tempfile::tempdir().unwrap();
        let report = serde_json::json!({
            "classifier": {"model": "c.onnx"},
            "variants": [
                {"id": "uncached", "policy": "uncached", "speedup": 1.0, "psnr_mean": "inf",
                 "fd": 11.7, "skip_rate": 0.0, "skip_map": [[0.0, 0.0], [0.0, 0.0]]},
                {"id": "steps-25", "policy": "steps", "speedup": 2.0, "psnr_mean": 47.1,
                 "fd": 12.8, "skip_rate": 0.0, "skip_map": [[0.0, 0.0]]},
                {"id": "fastcache-s2", "policy": "fastcache", "speedup": 1.9, "psnr_mean": 55.0,
                 "fd": null, "skip_rate": 0.5, "skip_map": [[0.0, 0.0], [1.0, 1.0]]}
            ]
        });
        std::fs::write(
            dir.path().join("report.json"),
            serde_json::to_vec(&report).unwrap(),
        )
        .unwrap();
        let written = redraw(dir.path()).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["speed_vs_fidelity.png", "skip_maps.png"]);
        // Two panels (PSNR and FD), and one skip map (the rewrite's only).
        assert_eq!(
            decode(&written[0]),
            (PANEL_W, 2 * PANEL_H, png::ColorType::Rgb)
        );
        let map = [vec![0.0, 0.0], vec![1.0, 1.0]];
        let layout = SkipMapLayout::new(&[SkipMap {
            title: String::new(),
            map: &map,
        }]);
        assert_eq!(
            decode(&written[1]),
            (layout.width, layout.height, png::ColorType::Rgb)
        );
        // Without a classifier, one panel.
        let mut report = report;
        report["classifier"] = serde_json::Value::Null;
        std::fs::write(
            dir.path().join("report.json"),
            serde_json::to_vec(&report).unwrap(),
        )
        .unwrap();
        let written = redraw(dir.path()).unwrap();
        assert_eq!(decode(&written[0]).1, PANEL_H);
        // A malformed report says what is missing.
        report["variants"][1]
            .as_object_mut()
            .unwrap()
            .remove("speedup");
        std::fs::write(
            dir.path().join("report.json"),
            serde_json::to_vec(&report).unwrap(),
        )
        .unwrap();
        let error = redraw(dir.path()).unwrap_err().to_string();
        assert!(error.contains("lacks speedup"), "{error}");
    }
}
