//! Draws the figures of bench reports again from their report.json, without running the bench:
//! speed_vs_fidelity.png and skip_maps.png. samples.png is left as it is (report.json does not
//! hold the images), unless `--samples-from-old-figure` is given.
//!
//! ```sh
//! cargo run --example redraw_bench_figures -- [--samples-from-old-figure] DIR...
//! ```
//!
//! `--samples-from-old-figure` draws samples.png again from the images of a samples.png in the
//! layout of the bench's earlier hand-written plotter (8-pixel bitmap-font titles, 10 images a
//! row at twice their size, 4-pixel gaps): both write a pixel as round((v + 1) · 127.5) of the
//! sample value v, so reading the images back from that figure and drawing them again gives the
//! same pixels. The layout is checked (every image pixel a 2 × 2 block, the gaps white) before
//! anything is written.
//!
//! Tests: `cargo test --example redraw_bench_figures`.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use ndarray::Array4;

/// The earlier samples figure's geometry: 8 pixels a title character, 10 images a row, twice
/// their size, 4 pixels between and around them.
const OLD_PER_ROW: usize = 10;
const OLD_ZOOM: usize = 2;

/// The images of an earlier samples.png, one row per variant id (the report's order).
fn old_samples(png_bytes: &[u8], ids: &[String]) -> anyhow::Result<Vec<(String, Array4<f32>)>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![
        0;
        reader
            .output_buffer_size()
            .context("the figure is too large")?
    ];
    let info = reader.next_frame(&mut buf)?;
    ensure!(
        info.color_type == png::ColorType::Rgb && info.bit_depth == png::BitDepth::Eight,
        "not an 8-bit RGB figure"
    );
    let (width, height) = (info.width as usize, info.height as usize);
    let pixel = |x: usize, y: usize| {
        let i = (y * width + x) * 3;
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    let label_w = 8 * ids.iter().map(|t| t.chars().count()).max().unwrap_or(0) + 16;
    ensure!(
        !ids.is_empty() && (height - 4) % ids.len() == 0 && width > label_w + 4,
        "{width} x {height} pixels do not fit {} rows",
        ids.len()
    );
    let cell_h = (height - 4) / ids.len();
    ensure!(
        (width - label_w - 4) % OLD_PER_ROW == 0,
        "{width} pixels do not fit {OLD_PER_ROW} images beside titles of {label_w}"
    );
    let cell_w = (width - label_w - 4) / OLD_PER_ROW;
    let (h, w) = ((cell_h - 4) / OLD_ZOOM, (cell_w - 4) / OLD_ZOOM);
    let mut rows = Vec::new();
    for (r, id) in ids.iter().enumerate() {
        let oy = 4 + r * cell_h;
        let mut images = Array4::<f32>::zeros((OLD_PER_ROW, 3, h, w));
        let mut grey = true;
        for b in 0..OLD_PER_ROW {
            let ox = label_w + b * cell_w;
            for y in 0..h {
                for x in 0..w {
                    let p = pixel(ox + OLD_ZOOM * x, oy + OLD_ZOOM * y);
                    for (dy, dx) in [(0, 1), (1, 0), (1, 1)] {
                        ensure!(
                            pixel(ox + OLD_ZOOM * x + dx, oy + OLD_ZOOM * y + dy) == p,
                            "row {r}, image {b}: pixel ({x}, {y}) is not a 2 x 2 block: not the old layout"
                        );
                    }
                    grey &= p[0] == p[1] && p[1] == p[2];
                    for c in 0..3 {
                        images[[b, c, y, x]] = p[c] as f32 / 127.5 - 1.0;
                    }
                }
            }
            for gap in 0..4 {
                ensure!(
                    pixel(ox + OLD_ZOOM * w + gap, oy + h) == [255; 3]
                        && pixel(ox + w, oy + OLD_ZOOM * h + gap) == [255; 3],
                    "row {r}, image {b}: the gap around it is not white: not the old layout"
                );
            }
        }
        let images = if grey {
            images.slice(ndarray::s![.., 0..1, .., ..]).to_owned()
        } else {
            images
        };
        rows.push((id.clone(), images));
    }
    Ok(rows)
}

fn redraw_samples(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json"))?)?;
    let ids: Vec<String> = report["variants"]
        .as_array()
        .context("report.json has no variants")?
        .iter()
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect();
    let path = dir.join("samples.png");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows = old_samples(&bytes, &ids).with_context(|| format!("{}", path.display()))?;
    let views: Vec<(String, ndarray::ArrayView4<f32>)> =
        rows.iter().map(|(t, a)| (t.clone(), a.view())).collect();
    fastcache::bench::plot::samples_figure(&views, OLD_PER_ROW, OLD_ZOOM)?.save(&path)?;
    Ok(path)
}

fn main() -> anyhow::Result<()> {
    let mut samples = false;
    let mut dirs = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--samples-from-old-figure" => samples = true,
            flag if flag.starts_with('-') => bail!("unknown option {flag}"),
            _ => dirs.push(arg),
        }
    }
    if dirs.is_empty() {
        bail!(
            "usage: redraw_bench_figures [--samples-from-old-figure] DIR... (each DIR holding a bench's report.json)"
        );
    }
    for dir in &dirs {
        let dir = Path::new(dir);
        for file in fastcache::bench::plot::redraw(dir)? {
            println!("{}", file.display());
        }
        if samples && dir.join("samples.png").is_file() {
            println!("{}", redraw_samples(dir)?.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A figure in the old layout: white, titles left blank, images of 3 x 2 pixels.
    fn old_figure(ids: &[&str], value: impl Fn(usize, usize, usize, usize) -> u8) -> Vec<u8> {
        let label_w = 8 * ids.iter().map(|t| t.len()).max().unwrap() + 16;
        let (h, w) = (2, 3);
        let (cell_h, cell_w) = (h * 2 + 4, w * 2 + 4);
        let (width, height) = (label_w + 10 * cell_w + 4, ids.len() * cell_h + 4);
        let mut pixels = vec![255u8; width * height * 3];
        for r in 0..ids.len() {
            for b in 0..10 {
                for y in 0..h * 2 {
                    for x in 0..w * 2 {
                        let i = ((4 + r * cell_h + y) * width + label_w + b * cell_w + x) * 3;
                        pixels[i..i + 3].fill(value(r, b, y / 2, x / 2));
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&pixels).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn the_old_figures_images_are_read_back_exactly() {
        let ids = ["uncached", "fastcache-s2"];
        let value = |r: usize, b: usize, y: usize, x: usize| (r * 100 + b * 10 + y * 3 + x) as u8;
        let bytes = old_figure(&ids, value);
        let names: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let rows = old_samples(&bytes, &names).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].0, "fastcache-s2");
        assert_eq!(rows[1].1.shape(), &[10, 1, 2, 3]);
        for (r, (_, images)) in rows.iter().enumerate() {
            for ((b, _, y, x), v) in images.indexed_iter() {
                // The new figure writes the same pixel.
                assert_eq!(
                    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8,
                    value(r, b, y, x)
                );
            }
        }
    }

    #[test]
    fn a_figure_in_another_layout_is_refused() {
        let bytes = old_figure(&["uncached", "fastcache-s2"], |_, _, y, x| {
            (y * 3 + x) as u8
        });
        // The ids do not give the titles' width the figure was drawn with.
        let error = old_samples(&bytes, &["a".into(), "b".into()]).unwrap_err();
        assert!(error.to_string().contains("not"), "{error}");
        let error = old_samples(&bytes, &["a".into(), "b".into(), "c".into()]).unwrap_err();
        assert!(error.to_string().contains("rows"), "{error}");
    }
}
