//! `report.md`: one table per group (site or pooled) with every output's
//! AUC (95 % CI), sensitivity, specificity and ECE, and links to the charts.

use std::fmt::Write;

use super::Report;

/// The Markdown report.
pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let m = &report.model;
    let _ = writeln!(md, "# Evaluation of {} {}\n", m.name, m.version);
    let _ = writeln!(
        md,
        "Model digest `{}`, trained: {}. AUC with DeLong 95 % CI; sensitivity and specificity \
at the operating point; ECE over 10 equal-width bins.\n",
        m.digest, m.trained
    );
    for group in &report.groups {
        let _ = writeln!(md, "## {} ({} cases)\n", group.group, group.cases);
        if !group.refused.is_empty() {
            let _ = writeln!(
                md,
                "{} case(s) refused by the pipeline (not scored).\n",
                group.refused.len()
            );
        }
        let _ = writeln!(
            md,
            "| horizon | output | AUC (95 % CI) | positives | sensitivity | specificity | threshold | ECE |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for o in &group.outputs {
            let auc = o.auc.map_or("n/a (one class only)".to_owned(), |a| {
                format!("{:.3} ({:.3}–{:.3})", a.auc, a.ci_low, a.ci_high)
            });
            let positives = o.auc.map_or("—".to_owned(), |a| {
                format!("{}/{}", a.positives, a.positives + a.negatives)
            });
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.3} |",
                o.horizon,
                o.output,
                auc,
                positives,
                o.sensitivity,
                o.specificity,
                o.threshold,
                o.ece
            );
        }
        for horizon in ["24h", "72h"] {
            let _ = writeln!(
                md,
                "\n![ROC {g} {horizon}](roc-{g}-{horizon}.png) ![reliability {g} {horizon}](reliability-{g}-{horizon}.png)",
                g = group.group
            );
        }
        md.push('\n');
    }
    md
}
