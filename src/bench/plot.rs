//! The bench's pictures, drawn on a plain RGB raster and written with the `png` crate: speed
//! against fidelity per policy, the skip map of every run (steps × blocks), and a strip of
//! samples per variant. Text uses the public-domain 8×8 bitmap font of the `font8x8` crate, so
//! nothing depends on system font libraries (fontconfig, freetype); the price is plain lettering.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [160, 160, 160];
pub const LIGHT: Rgb = [225, 225, 225];

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

/// An RGB raster.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<Rgb>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![WHITE; width * height],
        }
    }

    pub fn get(&self, x: usize, y: usize) -> Rgb {
        self.pixels[y * self.width + x]
    }

    pub fn set(&mut self, x: i64, y: i64, colour: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = colour;
        }
    }

    pub fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, colour: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, colour);
            }
        }
    }

    /// A line of the given width (a square brush along Bresenham's path).
    pub fn line(&mut self, from: (i64, i64), to: (i64, i64), width: i64, colour: Rgb) {
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (sx, sy) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
        let mut err = dx + dy;
        let lo = -(width - 1) / 2;
        loop {
            self.fill(x + lo, y + lo, width, width, colour);
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// A dashed horizontal line.
    pub fn dashed_hline(&mut self, x0: i64, x1: i64, y: i64, colour: Rgb) {
        for x in x0..=x1 {
            if (x - x0) % 8 < 4 {
                self.set(x, y, colour);
            }
        }
    }

    /// A filled marker: circle, square, triangle or diamond by index.
    pub fn marker(&mut self, x: i64, y: i64, shape: usize, colour: Rgb) {
        let r = 4i64;
        for dy in -r..=r {
            for dx in -r..=r {
                let inside = match shape % 4 {
                    0 => dx * dx + dy * dy <= r * r,
                    1 => true,
                    2 => dy >= -r && 2 * dx.abs() <= dy + r,
                    _ => dx.abs() + dy.abs() <= r,
                };
                if inside {
                    self.set(x + dx, y + dy, colour);
                }
            }
        }
    }

    /// Text in the 8×8 font, `scale` pixels per font pixel; (x, y) is the top left corner.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, colour: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let glyph = glyph(c);
            let x0 = x + i as i64 * 8 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        self.fill(
                            x0 + col * scale,
                            y + row as i64 * scale,
                            scale,
                            scale,
                            colour,
                        );
                    }
                }
            }
        }
    }

    /// Text turned 90° counter-clockwise, reading upwards; (x, y) is the bottom left corner.
    pub fn text_up(&mut self, x: i64, y: i64, text: &str, colour: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let glyph = glyph(c);
            let y0 = y - i as i64 * 8;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        self.set(x + row as i64, y0 - col, colour);
                    }
                }
            }
        }
    }

    /// Writes the canvas as an 8-bit RGB PNG.
    pub fn write_png(&self, writer: impl Write) -> anyhow::Result<()> {
        let mut encoder = png::Encoder::new(writer, self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut png = encoder.write_header()?;
        let bytes: Vec<u8> = self.pixels.iter().flatten().copied().collect();
        png.write_image_data(&bytes)?;
        png.finish()?;
        Ok(())
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
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

/// The font's rows for a character (bit i of a row is column i); '?' for what it lacks.
fn glyph(c: char) -> [u8; 8] {
    let code = c as usize;
    if code < 128 {
        font8x8::legacy::BASIC_LEGACY[code]
    } else {
        font8x8::legacy::BASIC_LEGACY['?' as usize]
    }
}

/// Pixel width of text at a scale.
pub fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 8 * scale
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

/// One point of a scatter series.
#[derive(Clone, Debug)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// A policy's points, drawn in its colour and joined in order of x.
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
}

const PANEL_W: i64 = 640;
const PANEL_H: i64 = 420;

impl Scatter<'_> {
    /// Draws the panel with its top left corner at (ox, oy), PANEL_W × PANEL_H pixels.
    pub fn draw(&self, canvas: &mut Canvas, ox: i64, oy: i64) {
        let (left, right, top, bottom) = (ox + 70, ox + PANEL_W - 150, oy + 34, oy + PANEL_H - 50);
        let points: Vec<&Point> = self
            .series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|p| p.x.is_finite() && p.y.is_finite())
            .collect();
        let mut ys: Vec<f64> = points.iter().map(|p| p.y).collect();
        if let Some((r, _)) = &self.reference {
            ys.push(*r);
        }
        let xs: Vec<f64> = points.iter().map(|p| p.x).chain([1.0]).collect();
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() {
                (0.0, 1.0)
            } else if hi - lo < 1e-9 {
                (lo - 0.5, hi + 0.5)
            } else {
                let pad = (hi - lo) * 0.08;
                (lo - pad, hi + pad)
            }
        };
        let (x_lo, x_hi) = range(&xs);
        let (y_lo, y_hi) = range(&ys);
        let px =
            |x: f64| left + ((x - x_lo) / (x_hi - x_lo) * (right - left) as f64).round() as i64;
        let py =
            |y: f64| bottom - ((y - y_lo) / (y_hi - y_lo) * (bottom - top) as f64).round() as i64;

        canvas.text(ox + 70, oy + 10, self.title, 1, BLACK);
        // Grid, ticks and their labels.
        let x_ticks = ticks(x_lo, x_hi, 6);
        let x_step = x_ticks.get(1).map_or(1.0, |b| b - x_ticks[0]);
        for &t in &x_ticks {
            let x = px(t);
            canvas.line((x, top), (x, bottom), 1, LIGHT);
            canvas.line((x, bottom), (x, bottom + 4), 1, BLACK);
            let label = tick_label(t, x_step);
            canvas.text(x - text_width(&label, 1) / 2, bottom + 8, &label, 1, BLACK);
        }
        let y_ticks = ticks(y_lo, y_hi, 6);
        let y_step = y_ticks.get(1).map_or(1.0, |b| b - y_ticks[0]);
        for &t in &y_ticks {
            let y = py(t);
            canvas.line((left, y), (right, y), 1, LIGHT);
            canvas.line((left - 4, y), (left, y), 1, BLACK);
            let label = tick_label(t, y_step);
            canvas.text(left - 8 - text_width(&label, 1), y - 4, &label, 1, BLACK);
        }
        canvas.line((left, top), (left, bottom), 1, BLACK);
        canvas.line((left, bottom), (right, bottom), 1, BLACK);
        canvas.text(
            (left + right) / 2 - text_width(self.x_title, 1) / 2,
            bottom + 24,
            self.x_title,
            1,
            BLACK,
        );
        canvas.text_up(
            ox + 8,
            (top + bottom) / 2 + text_width(self.y_title, 1) / 2,
            self.y_title,
            BLACK,
        );
        if let Some((r, label)) = &self.reference {
            let y = py(*r);
            canvas.dashed_hline(left, right, y, GREY);
            canvas.text(left + 4, y - 10, label, 1, GREY);
        }
        // Series: lines first, then markers and labels on top.
        for (i, series) in self.series.iter().enumerate() {
            let mut pts: Vec<&Point> = series
                .points
                .iter()
                .filter(|p| p.x.is_finite() && p.y.is_finite())
                .collect();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            for pair in pts.windows(2) {
                canvas.line(
                    (px(pair[0].x), py(pair[0].y)),
                    (px(pair[1].x), py(pair[1].y)),
                    2,
                    series.colour,
                );
            }
            for p in &pts {
                canvas.marker(px(p.x), py(p.y), i, series.colour);
                canvas.text(px(p.x) + 7, py(p.y) - 11, &p.label, 1, series.colour);
            }
        }
        // Legend, right of the plot area.
        let mut y = top;
        for (i, series) in self.series.iter().enumerate() {
            canvas.marker(right + 22, y + 4, i, series.colour);
            canvas.text(right + 32, y, &series.name, 1, series.colour);
            y += 16;
        }
    }
}

/// Scatter panels stacked vertically in one picture.
pub fn scatter_figure(panels: &[Scatter]) -> Canvas {
    let mut canvas = Canvas::new(PANEL_W as usize, (PANEL_H as usize) * panels.len().max(1));
    for (i, panel) in panels.iter().enumerate() {
        panel.draw(&mut canvas, 0, i as i64 * PANEL_H);
    }
    canvas
}

/// One run's skip map: rows are blocks, columns steps; the value is how often (over the runs of
/// a variant) that block was skipped at that step, 0 = always computed, 1 = always skipped.
pub struct SkipMap<'a> {
    pub title: String,
    pub map: &'a [Vec<f64>],
}

/// Skip maps stacked vertically: a panel per variant, titled, steps along x, blocks along y.
/// Dark = skipped, white = computed.
pub fn skip_map_figure(maps: &[SkipMap]) -> Canvas {
    let steps = maps.iter().map(|m| m.map.len()).max().unwrap_or(1).max(1);
    let blocks = maps
        .iter()
        .flat_map(|m| m.map.iter().map(Vec::len))
        .max()
        .unwrap_or(1)
        .max(1);
    let cell_w = (600 / steps).clamp(4, 24) as i64;
    let cell_h = (96 / blocks).clamp(6, 16) as i64;
    let left = 60i64;
    let panel_h = 20 + blocks as i64 * cell_h + 22;
    let heading = "skip maps: x = step, y = block 0 (top) .. L-1; dark = skipped";
    let widest_title = maps
        .iter()
        .map(|m| text_width(&m.title, 1))
        .max()
        .unwrap_or(0);
    let width = (left + steps as i64 * cell_w + 20)
        .max(text_width(heading, 1) + 16)
        .max(widest_title + 16);
    let height = 30 + panel_h * maps.len().max(1) as i64;
    let mut canvas = Canvas::new(width as usize, height as usize);
    canvas.text(8, 8, heading, 1, BLACK);
    for (i, m) in maps.iter().enumerate() {
        let oy = 30 + i as i64 * panel_h;
        canvas.text(8, oy, &m.title, 1, BLACK);
        let top = oy + 14;
        for (step, row) in m.map.iter().enumerate() {
            for (block, &v) in row.iter().enumerate() {
                // 1 (always skipped) is near black, anything skipped at all visibly grey.
                let shade = (255.0 - 225.0 * v.clamp(0.0, 1.0)).round() as u8;
                canvas.fill(
                    left + step as i64 * cell_w,
                    top + block as i64 * cell_h,
                    cell_w - 1,
                    cell_h - 1,
                    [shade, shade, shade],
                );
            }
        }
        // A frame, block labels, and step ticks every 10 steps.
        let (w, h) = (m.map.len() as i64 * cell_w, blocks as i64 * cell_h);
        canvas.line((left - 1, top - 1), (left + w, top - 1), 1, GREY);
        canvas.line((left - 1, top + h), (left + w, top + h), 1, GREY);
        canvas.line((left - 1, top - 1), (left - 1, top + h), 1, GREY);
        canvas.line((left + w, top - 1), (left + w, top + h), 1, GREY);
        canvas.text(8, top + h / 2 - 4, &format!("L={blocks}"), 1, GREY);
        for step in (0..m.map.len()).step_by(10) {
            let label = (step + 1).to_string();
            canvas.text(left + step as i64 * cell_w, top + h + 3, &label, 1, GREY);
        }
    }
    canvas
}

/// Rows of sample images [B, C, H, W] in [−1, 1] (1 or 3 channels), up to `per_row` per row,
/// each row titled on its left, images scaled up by `zoom`.
pub fn samples_figure(
    rows: &[(String, ndarray::ArrayView4<f32>)],
    per_row: usize,
    zoom: usize,
) -> Canvas {
    let (h, w) = rows
        .first()
        .map_or((1, 1), |(_, a)| (a.shape()[2], a.shape()[3]));
    let label_w = rows
        .iter()
        .map(|(t, _)| text_width(t, 1))
        .max()
        .unwrap_or(0)
        + 16;
    let cell = |n: usize| (n * zoom + 4) as i64;
    let width = label_w + per_row as i64 * cell(w) + 4;
    let height = rows.len() as i64 * cell(h) + 4;
    let mut canvas = Canvas::new(width as usize, height.max(1) as usize);
    for (r, (title, images)) in rows.iter().enumerate() {
        let oy = 4 + r as i64 * cell(h);
        canvas.text(8, oy + cell(h) / 2 - 6, title, 1, BLACK);
        let channels = images.shape()[1];
        for b in 0..images.shape()[0].min(per_row) {
            let ox = label_w + b as i64 * cell(w);
            for y in 0..h * zoom {
                for x in 0..w * zoom {
                    let value = |c: usize| {
                        let v = images[[b, c, y / zoom, x / zoom]];
                        ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                    };
                    let colour = if channels >= 3 {
                        [value(0), value(1), value(2)]
                    } else {
                        let g = value(0);
                        [g, g, g]
                    };
                    canvas.set(ox + x as i64, oy + y as i64, colour);
                }
            }
        }
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(0.93, 3.4, 6);
        assert_eq!(t, vec![1.0, 1.5, 2.0, 2.5, 3.0]);
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(20.0, 5.0), "20");
    }

    #[test]
    fn text_lands_in_the_canvas_and_a_png_decodes_back() {
        let mut canvas = Canvas::new(40, 12);
        canvas.text(0, 0, "A1", 1, BLACK);
        let ink = (0..12)
            .flat_map(|y| (0..40).map(move |x| (x, y)))
            .filter(|&(x, y)| canvas.get(x, y) == BLACK)
            .count();
        assert!(ink > 10, "the glyphs drew {ink} pixels");
        let mut bytes = Vec::new();
        canvas.write_png(&mut bytes).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (40, 12));
    }

    #[test]
    fn a_skip_map_shades_skipped_cells_dark() {
        let map = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
        let canvas = skip_map_figure(&[SkipMap {
            title: "t".into(),
            map: &map,
        }]);
        // Cell (step 0, block 0) is white, (step 0, block 1) dark.
        let cell_w = (600 / 2).clamp(4, 24) as usize;
        let cell_h = (96 / 2).clamp(6, 16) as usize;
        let (left, top) = (60, 30 + 14);
        assert_eq!(canvas.get(left + 1, top + 1), WHITE);
        let dark = canvas.get(left + 1, top + cell_h + 1);
        assert!(dark[0] < 60, "{dark:?}");
        let dark = canvas.get(left + cell_w + 1, top + 1);
        assert!(dark[0] < 60, "{dark:?}");
    }
}
