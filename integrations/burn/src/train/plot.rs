//! The PNG of a run's curves (loss and accuracy against steps) from its `metrics.csv`, drawn
//! with `plotters`. Axis labels need a TrueType font: DejaVu Sans where the system has it
//! (Debian's `fonts-dejavu-core`), else the curves are drawn without text.

use std::path::Path;
use std::sync::Once;

use linattn::{Error, Result};
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a system font for plotters' `ab_glyph` text backend, once; whether one was found.
fn font() -> bool {
    static REGISTER: Once = Once::new();
    static mut FOUND: bool = false;
    REGISTER.call_once(|| {
        for path in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    // SAFETY: written once, inside `call_once`, before any read below.
                    unsafe { FOUND = true };
                    break;
                }
            }
        }
    });
    // SAFETY: `call_once` has returned, so the write (if any) happened before this read.
    unsafe { FOUND }
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("plotting the curves: {e}"))
}

/// Draws `curves.png` (two panels: loss, accuracy) from the text of a `metrics.csv`.
pub fn curves(csv: &str, path: &Path) -> Result<()> {
    let mut loss = Vec::new();
    let mut acc = Vec::new();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 3 {
            continue;
        }
        let (Ok(step), Ok(l), Ok(a)) = (
            f[0].parse::<f64>(),
            f[1].parse::<f64>(),
            f[2].parse::<f64>(),
        ) else {
            continue;
        };
        if l.is_finite() {
            loss.push((step, l));
        }
        if a.is_finite() {
            acc.push((step, a));
        }
    }
    let text = font();
    let root = BitMapBackend::new(path, (760, 300)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (left, right) = root.split_horizontally(380);
    let last = loss.last().map_or(1.0, |p| p.0).max(1.0);
    let max_loss = loss.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-6) * 1.05;
    panel(&left, "loss", &loss, 0.0..max_loss, last, &BLUE, text)?;
    panel(&right, "accuracy", &acc, 0.0..1.0, last, &RED, text)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    name: &str,
    points: &[(f64, f64)],
    y: std::ops::Range<f64>,
    last: f64,
    color: &RGBColor,
    text: bool,
) -> Result<()> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(name, ("sans-serif", 18))
            .x_label_area_size(30)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..last, y)
        .map_err(plot_error)?;
    if text {
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("step")
            .draw()
            .map_err(plot_error)?;
    }
    chart
        .draw_series(LineSeries::new(points.iter().copied(), color))
        .map_err(plot_error)?;
    Ok(())
}
