//! The simulation's bar charts, like EXAM's (PNG and SVG, plotters, the
//! bundled font): per horizon the AUC per site of every model with its
//! DeLong 95 % CI (`auc-per-site-<h>`), mean AUC and generalisability per
//! model (`auc-summary-<h>`), and the bytes each site sent per round
//! (`bytes-per-round`).

use std::path::Path;

use plotters::prelude::*;

use super::SimulateError;
use super::report::SimulationReport;

const COLOURS: [RGBColor; 6] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
];

/// One bar: group index, value, optional CI.
struct Bar {
    group: usize,
    series: usize,
    value: f64,
    ci: Option<(f64, f64)>,
}

/// A grouped bar chart.
struct Bars {
    title: String,
    y_label: String,
    groups: Vec<String>,
    series: Vec<String>,
    bars: Vec<Bar>,
    y_range: (f64, f64),
}

/// Draws every chart into `dir`.
///
/// # Errors
/// [`SimulateError::Chart`].
pub fn draw_all(dir: &Path, report: &SimulationReport) -> Result<(), SimulateError> {
    crate::evaluate::charts::register_font();
    for h in &report.horizons {
        let series: Vec<String> = h.models.iter().map(|m| m.model.clone()).collect();
        let mut per_site = Bars {
            title: format!("AUC of {} at {} per site (95 % CI)", h.output, h.horizon),
            y_label: "AUC".to_owned(),
            groups: report.sites.iter().map(|s| s.id.clone()).collect(),
            series: series.clone(),
            bars: Vec::new(),
            y_range: (0.4, 1.0),
        };
        for (m, model) in h.models.iter().enumerate() {
            for (i, site) in model.per_site.iter().enumerate() {
                if let Some(value) = site.auc {
                    per_site.bars.push(Bar {
                        group: i,
                        series: m,
                        value,
                        ci: site.ci_low.zip(site.ci_high),
                    });
                }
            }
        }
        draw(dir, &format!("auc-per-site-{}", h.horizon), &per_site)?;
        let mut summary = Bars {
            title: format!(
                "{} at {}: mean AUC and generalisability",
                h.output, h.horizon
            ),
            y_label: "AUC".to_owned(),
            groups: vec!["mean AUC".to_owned(), "generalisability".to_owned()],
            series,
            bars: Vec::new(),
            y_range: (0.4, 1.0),
        };
        for (m, model) in h.models.iter().enumerate() {
            for (g, value) in [model.mean_auc, model.generalisability]
                .into_iter()
                .enumerate()
            {
                if let Some(value) = value {
                    summary.bars.push(Bar {
                        group: g,
                        series: m,
                        value,
                        ci: None,
                    });
                }
            }
        }
        draw(dir, &format!("auc-summary-{}", h.horizon), &summary)?;
    }
    if let Some(first) = report.federations.first() {
        let rounds: Vec<u64> = {
            let mut r: Vec<u64> = report
                .federations
                .iter()
                .flat_map(|f| {
                    f.bytes
                        .iter()
                        .flat_map(|s| s.per_round.iter().map(|r| r.round))
                })
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        let mut bytes = Bars {
            title: "KiB sent per site per round".to_owned(),
            y_label: "KiB".to_owned(),
            groups: first.bytes.iter().map(|s| s.site.clone()).collect(),
            series: Vec::new(),
            bars: Vec::new(),
            y_range: (0.0, 1.0),
        };
        let mut top: f64 = 1.0;
        for f in &report.federations {
            for &round in &rounds {
                let series = bytes.series.len();
                bytes.series.push(format!("{} round {round}", f.variant));
                for (i, site) in f.bytes.iter().enumerate() {
                    if let Some(r) = site.per_round.iter().find(|r| r.round == round) {
                        let kib = r.bytes as f64 / 1024.0;
                        top = top.max(kib);
                        bytes.bars.push(Bar {
                            group: i,
                            series,
                            value: kib,
                            ci: None,
                        });
                    }
                }
            }
        }
        bytes.y_range = (0.0, top * 1.15);
        draw(dir, "bytes-per-round", &bytes)?;
    }
    Ok(())
}

fn draw(dir: &Path, name: &str, bars: &Bars) -> Result<(), SimulateError> {
    for ext in ["png", "svg"] {
        let path = dir.join(format!("{name}.{ext}"));
        let result = if ext == "png" {
            let root = BitMapBackend::new(&path, (960, 540)).into_drawing_area();
            paint(&root, bars).and_then(|()| root.present().map_err(|e| e.to_string()))
        } else {
            let root = SVGBackend::new(&path, (960, 540)).into_drawing_area();
            paint(&root, bars).and_then(|()| root.present().map_err(|e| e.to_string()))
        };
        result.map_err(|reason| SimulateError::Chart {
            path: path.display().to_string(),
            reason,
        })?;
    }
    Ok(())
}

fn paint<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    bars: &Bars,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let groups = bars.groups.len().max(1);
    let series = bars.series.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(&bars.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups as f64, bars.y_range.0..bars.y_range.1)
        .map_err(e)?;
    let names = bars.groups.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&|x| {
            let centre = x - x.floor();
            if (centre - 0.5).abs() < 0.01 {
                names.get(x.floor() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(bars.y_label.as_str())
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    let width = 0.8 / series as f64;
    for s in 0..series {
        let colour = COLOURS[s % COLOURS.len()];
        let label = bars.series.get(s).cloned().unwrap_or_default();
        let rects: Vec<_> = bars
            .bars
            .iter()
            .filter(|b| b.series == s)
            .map(|b| {
                let x0 = b.group as f64 + 0.1 + width * s as f64;
                Rectangle::new(
                    [(x0, bars.y_range.0), (x0 + width * 0.9, b.value)],
                    colour.filled(),
                )
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        let whiskers: Vec<_> = bars
            .bars
            .iter()
            .filter(|b| b.series == s)
            .filter_map(|b| {
                let (lo, hi) = b.ci?;
                let x = b.group as f64 + 0.1 + width * (s as f64 + 0.45);
                Some(PathElement::new(
                    [(x, lo.max(bars.y_range.0)), (x, hi)],
                    BLACK.stroke_width(1),
                ))
            })
            .collect();
        chart.draw_series(whiskers).map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(e)?;
    Ok(())
}
