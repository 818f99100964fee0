//! ROC curves and reliability diagrams, one chart per group and horizon
//! with the three outputs, as PNG and SVG (plotters). Text is drawn with
//! the bundled DejaVu Sans (`host/assets/`), so charts look the same on
//! every box.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::{EvaluateError, GroupReport, OutputMetrics};

static FONT: Once = Once::new();
const FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const COLOURS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

/// Registers the bundled font as `sans-serif` (once per process).
pub fn register_font() {
    FONT.call_once(|| {
        // The bundled font parses; failure would only lose text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_BYTES);
    });
}

fn chart_error(path: &Path, e: impl std::fmt::Display) -> EvaluateError {
    EvaluateError::Chart {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Draws `roc-<group>-<h>.{png,svg}` and `reliability-<group>-<h>.{png,svg}`.
///
/// # Errors
/// [`EvaluateError::Chart`].
pub fn draw_group(dir: &Path, group: &GroupReport) -> Result<(), EvaluateError> {
    register_font();
    for horizon in ["24h", "72h"] {
        let outputs: Vec<&OutputMetrics> = group
            .outputs
            .iter()
            .filter(|o| o.horizon == horizon)
            .collect();
        for (kind, ext) in [
            ("roc", "png"),
            ("roc", "svg"),
            ("reliability", "png"),
            ("reliability", "svg"),
        ] {
            let path = dir.join(format!("{kind}-{}-{horizon}.{ext}", group.group));
            let title = format!(
                "{} — {} ({horizon})",
                group.group,
                if kind == "roc" { "ROC" } else { "reliability" }
            );
            let result = if ext == "png" {
                let root = BitMapBackend::new(&path, (640, 560)).into_drawing_area();
                draw(&root, &title, kind, &outputs)
                    .and_then(|()| root.present().map_err(|e| e.to_string()))
            } else {
                let root = SVGBackend::new(&path, (640, 560)).into_drawing_area();
                draw(&root, &title, kind, &outputs)
                    .and_then(|()| root.present().map_err(|e| e.to_string()))
            };
            result.map_err(|e| chart_error(&path, e))?;
        }
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    kind: &str,
    outputs: &[&OutputMetrics],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (x_label, y_label) = if kind == "roc" {
        ("1 − specificity", "sensitivity")
    } else {
        ("predicted probability", "observed frequency")
    };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))
        .map_err(|e| e.to_string())?;
    for (o, colour) in outputs.iter().zip(COLOURS) {
        let label = match (kind, o.auc) {
            ("roc", Some(a)) => format!("{} (AUC {:.3})", o.output, a.auc),
            ("roc", None) => format!("{} (one class)", o.output),
            _ => format!("{} (ECE {:.3})", o.output, o.ece),
        };
        let points: Vec<(f64, f64)> = if kind == "roc" {
            o.roc.clone()
        } else {
            o.reliability
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| (b.mean_predicted, b.observed))
                .collect()
        };
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}
