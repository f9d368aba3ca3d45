//! Human forms of a [`Report`]: `report.md` (tables) and `report.html` (one self-contained
//! page, inline SVG charts, no scripts or outside resources). Both are pure functions of the
//! report, so they are as reproducible as the checkpoint they describe.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::report::{Report, TensorReport};

/// Input and output bytes of one layer group, in output order.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSize {
    /// Layer group key.
    pub group: String,
    /// Input tensor bytes.
    pub bytes_in: u64,
    /// Output tensor bytes.
    pub bytes_out: u64,
}

/// Output shard file → its layer group.
fn shard_groups(report: &Report) -> BTreeMap<&str, &str> {
    report
        .shards
        .iter()
        .map(|s| (s.file.as_str(), s.group.as_str()))
        .collect()
}

/// Per-layer sizes: tensors summed by the group of their output shard.
pub fn layer_sizes(report: &Report) -> Vec<LayerSize> {
    let group_of = shard_groups(report);
    let mut layers: Vec<LayerSize> = Vec::new();
    for t in &report.tensors {
        let group = group_of.get(t.shard.as_str()).copied().unwrap_or(&t.shard);
        match layers.iter_mut().find(|l| l.group == group) {
            Some(l) => {
                l.bytes_in += t.bytes_in;
                l.bytes_out += t.bytes_out;
            }
            None => layers.push(LayerSize {
                group: group.to_string(),
                bytes_in: t.bytes_in,
                bytes_out: t.bytes_out,
            }),
        }
    }
    layers
}

/// Output bits per input element of a tensor.
pub fn bits_per_weight(t: &TensorReport) -> f64 {
    let n: u64 = t.shape.iter().product();
    if n == 0 {
        0.0
    } else {
        t.bytes_out as f64 * 8.0 / n as f64
    }
}

fn transformed(report: &Report) -> impl Iterator<Item = &TensorReport> {
    report.tensors.iter().filter(|t| t.action != "keep")
}

/// Formats bytes with a binary unit, e.g. `86.7 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Markdown table cell: no pipes or line breaks from names.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// A name as an inline code span in a table cell, fenced with more backticks than it holds.
fn code(s: &str) -> String {
    let mut run = 0;
    let mut longest = 0;
    for c in s.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    let pad = if longest > 0 { " " } else { "" };
    format!("{fence}{pad}{}{pad}{fence}", cell(s))
}

/// `report.md`: totals, per-layer sizes and every transformed tensor's numbers.
pub fn to_markdown(report: &Report) -> String {
    let t = &report.totals;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Compression report: recipe `{}`\n",
        cell(&report.recipe_name)
    );
    let _ = writeln!(
        md,
        "{} tensors: {} quantized, {} cast, {} pruned, {} kept. Tensor bytes {} -> {} \
         (ratio {:.2}x).",
        t.tensors,
        t.quantized,
        t.cast,
        t.pruned,
        t.kept,
        human(t.bytes_in),
        human(t.bytes_out),
        t.ratio
    );
    if t.pruned > 0 {
        let _ = writeln!(
            md,
            "\nSparsity over pruned tensors: {:.2}%.",
            t.global_sparsity * 100.0
        );
    }
    let _ = writeln!(md, "\n## Size per layer group\n");
    let _ = writeln!(
        md,
        "| layer group | input | output | ratio |\n|---|---:|---:|---:|"
    );
    for l in layer_sizes(report) {
        let ratio = if l.bytes_out == 0 {
            0.0
        } else {
            l.bytes_in as f64 / l.bytes_out as f64
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2}x |",
            cell(&l.group),
            human(l.bytes_in),
            human(l.bytes_out),
            ratio
        );
    }
    let _ = writeln!(md, "\n## Transformed tensors\n");
    let _ = writeln!(
        md,
        "| tensor | action | format | shape | bits/weight | relative error | SNR dB | max abs error |\n\
         |---|---|---|---|---:|---:|---:|---:|"
    );
    for r in transformed(report) {
        let snr = snr_text(r);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:?} | {:.3} | {:.3e} | {} | {:.3e} |",
            code(&r.name),
            cell(&r.action),
            cell(&r.detail),
            r.shape,
            bits_per_weight(r),
            r.error.rel_error,
            snr,
            r.error.max_abs_error
        );
    }
    let kept = report.tensors.len() - transformed(report).count();
    let _ = writeln!(md, "\n{kept} tensor(s) kept unchanged are not listed.");
    md
}

/// A tensor's SNR in dB, or `exact` when nothing was lost.
fn snr_text(r: &TensorReport) -> String {
    r.error
        .snr_db
        .map_or_else(|| "exact".to_string(), |s| format!("{s:.1}"))
}

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CHART_W: f64 = 760.0;
const LABEL_W: f64 = 300.0;
/// Characters of a bar label that fit `LABEL_W`; longer names keep their end.
const LABEL_CHARS: usize = 48;
const ROW_H: f64 = 16.0;

/// Horizontal bars, one row per label and one bar per series.
fn bar_chart(
    id: &str,
    title: &str,
    rows: &[(String, Vec<f64>)],
    series: &[&str],
    unit: &str,
) -> String {
    let max = rows
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0_f64, f64::max);
    let per_row = ROW_H * series.len() as f64 + 6.0;
    let height = 40.0 + per_row * rows.len() as f64;
    let colors = ["#4e79a7", "#f28e2b", "#59a14f"];
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<figure id="{id}" class="chart"><figcaption>{}</figcaption><svg xmlns="http://www.w3.org/2000/svg" role="img" width="{CHART_W}" height="{height}" viewBox="0 0 {CHART_W} {height}">"#,
        esc(title)
    );
    for (i, name) in series.iter().enumerate() {
        let x = LABEL_W + 150.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="6" width="10" height="10" fill="{}"/><text x="{}" y="15" font-size="11">{}</text>"#,
            colors[i % colors.len()],
            x + 14.0,
            esc(name)
        );
    }
    let span = CHART_W - LABEL_W - 90.0;
    for (r, (label, values)) in rows.iter().enumerate() {
        let y0 = 28.0 + per_row * r as f64;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"#,
            LABEL_W - 6.0,
            y0 + per_row / 2.0,
            esc(&shorten(label))
        );
        for (i, v) in values.iter().enumerate() {
            let w = if max > 0.0 { v / max * span } else { 0.0 };
            let y = y0 + ROW_H * i as f64;
            let _ = write!(
                svg,
                r#"<rect class="bar" x="{LABEL_W}" y="{y}" width="{w:.2}" height="{}" fill="{}"><title>{}: {} {}</title></rect><text x="{:.2}" y="{}" font-size="10">{}</text>"#,
                ROW_H - 3.0,
                colors[i % colors.len()],
                esc(label),
                fmt_value(*v),
                esc(unit),
                LABEL_W + w + 4.0,
                y + ROW_H - 5.0,
                fmt_value(*v)
            );
        }
    }
    svg.push_str("</svg></figure>");
    svg
}

/// `label`, or its last characters after an ellipsis when it is too long to show.
fn shorten(label: &str) -> String {
    let n = label.chars().count();
    if n <= LABEL_CHARS {
        label.to_string()
    } else {
        let tail: String = label.chars().skip(n - (LABEL_CHARS - 1)).collect();
        format!("…{tail}")
    }
}

fn fmt_value(v: f64) -> String {
    if v != 0.0 && (v.abs() < 0.01 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.3}")
    }
}

/// Relative error (log scale) against bits per weight, one point per transformed tensor.
fn scatter(id: &str, title: &str, points: &[(String, f64, f64)]) -> String {
    let (w, h, pad) = (CHART_W, 360.0, 56.0);
    let max_x = points.iter().map(|p| p.1).fold(1.0_f64, f64::max).ceil();
    let positive: Vec<f64> = points.iter().map(|p| p.2).filter(|e| *e > 0.0).collect();
    let lo = positive.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = positive.iter().copied().fold(0.0_f64, f64::max);
    let (lo, hi) = if positive.is_empty() {
        (-6.0, 0.0)
    } else {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    };
    let sx = |x: f64| pad + x / max_x * (w - 2.0 * pad);
    let sy = |e: f64| {
        let l = if e > 0.0 { e.log10() } else { lo };
        h - pad - (l - lo) / (hi - lo) * (h - 2.0 * pad)
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<figure id="{id}" class="chart"><figcaption>{}</figcaption><svg xmlns="http://www.w3.org/2000/svg" role="img" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#,
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="#333"/>"##,
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">bits per weight</text><text x="14" y="{}" font-size="11" transform="rotate(-90 14 {})" text-anchor="middle">relative error (log10)</text>"#,
        w / 2.0,
        h - 16.0,
        h / 2.0,
        h / 2.0
    );
    let mut tick = 0.0;
    while tick <= max_x {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{tick}</text>"#,
            sx(tick),
            h - pad + 14.0
        );
        tick += (max_x / 8.0).ceil().max(1.0);
    }
    let step = ((hi - lo) / 12.0).ceil().max(1.0);
    let mut decade = lo;
    while decade <= hi {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{:.1}" font-size="10" text-anchor="end">1e{decade}</text>"#,
            pad - 4.0,
            sy(10f64.powf(decade)) + 3.0
        );
        decade += step;
    }
    for (name, x, e) in points {
        // An exact reconstruction has no place on a log scale: a hollow point on the floor.
        let (fill, what) = if *e > 0.0 {
            ("#e15759", format!("error {e:.3e}"))
        } else {
            ("none", "exact".to_string())
        };
        let _ = write!(
            svg,
            r##"<circle class="point" cx="{:.2}" cy="{:.2}" r="4" fill="{fill}" stroke="#e15759" fill-opacity="0.7"><title>{}: {:.3} bits, {what}</title></circle>"##,
            sx(*x),
            sy(*e),
            esc(name),
            x
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Most error bars a chart shows one per tensor; beyond it, one per layer group.
const MAX_TENSOR_BARS: usize = 150;

/// The error chart's rows: per transformed tensor, or for large models the largest error of
/// each layer group's transformed tensors.
fn error_rows(report: &Report) -> Vec<(String, Vec<f64>)> {
    if transformed(report).count() <= MAX_TENSOR_BARS {
        return transformed(report)
            .map(|r| (r.name.clone(), vec![r.error.rel_error]))
            .collect();
    }
    let group_of = shard_groups(report);
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    for r in transformed(report) {
        let group = group_of.get(r.shard.as_str()).copied().unwrap_or(&r.shard);
        match rows.iter_mut().find(|(g, _)| g == group) {
            Some((_, v)) => v[0] = v[0].max(r.error.rel_error),
            None => rows.push((group.to_string(), vec![r.error.rel_error])),
        }
    }
    rows
}

/// `report.html`: the totals, three charts (size per layer group before and after, error per
/// transformed tensor, error against bits per weight) and the tensor table.
pub fn to_html(report: &Report) -> String {
    let t = &report.totals;
    let sizes = layer_sizes(report);
    let largest = sizes
        .iter()
        .map(|l| l.bytes_in.max(l.bytes_out))
        .max()
        .unwrap_or(0);
    let (unit, per_unit) = if largest >= 1 << 30 {
        ("GiB", f64::from(1u32 << 30))
    } else if largest >= 1 << 20 {
        ("MiB", f64::from(1u32 << 20))
    } else {
        ("KiB", 1024.0)
    };
    let layers: Vec<(String, Vec<f64>)> = sizes
        .into_iter()
        .map(|l| {
            let v = |b: u64| b as f64 / per_unit;
            (l.group, vec![v(l.bytes_in), v(l.bytes_out)])
        })
        .collect();
    let size_title = format!("Size per layer group ({unit})");
    let errors = error_rows(report);
    let points: Vec<(String, f64, f64)> = transformed(report)
        .map(|r| (r.name.clone(), bits_per_weight(r), r.error.rel_error))
        .collect();
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Compression report: {recipe}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px}}td.n{{text-align:right}}figure{{margin:1.5em 0}}figcaption{{font-weight:600;margin-bottom:.4em}}</style>
</head><body>
<h1>Compression report: recipe <code>{recipe}</code></h1>
<p id="totals">{tensors} tensors: {q} quantized, {c} cast, {p} pruned, {k} kept. Tensor bytes {bin} &rarr; {bout} (ratio {ratio:.2}x).</p>
"#,
        recipe = esc(&report.recipe_name),
        tensors = t.tensors,
        q = t.quantized,
        c = t.cast,
        p = t.pruned,
        k = t.kept,
        bin = human(t.bytes_in),
        bout = human(t.bytes_out),
        ratio = t.ratio
    );
    html.push_str(&bar_chart(
        "size-per-layer",
        &size_title,
        &layers,
        &["input", "output"],
        unit,
    ));
    let error_title = if errors.len() < transformed(report).count() {
        "Largest relative error per layer group (‖W − Ŵ‖ / ‖W‖)"
    } else {
        "Relative error per transformed tensor (‖W − Ŵ‖ / ‖W‖)"
    };
    html.push_str(&bar_chart(
        "error-per-tensor",
        error_title,
        &errors,
        &["relative error"],
        "",
    ));
    html.push_str(&scatter(
        "error-vs-bits",
        "Relative error against bits per weight",
        &points,
    ));
    html.push_str(
        "<table id=\"tensors\"><thead><tr><th>tensor</th><th>action</th><th>format</th>\
         <th>shape</th><th>bits/weight</th><th>relative error</th><th>SNR dB</th></tr></thead><tbody>\n",
    );
    for r in transformed(report) {
        let snr = snr_text(r);
        let _ = writeln!(
            html,
            r#"<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{:?}</td><td class="n">{:.3}</td><td class="n">{:.3e}</td><td class="n">{}</td></tr>"#,
            esc(&r.name),
            esc(&r.action),
            esc(&r.detail),
            r.shape,
            bits_per_weight(r),
            r.error.rel_error,
            snr
        );
    }
    html.push_str("</tbody></table>\n</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ErrorSummary;
    use crate::recipe::Recipe;
    use crate::report::{ShardReport, Totals, REPORT_VERSION};

    fn tensor(
        name: &str,
        shard: &str,
        action: &str,
        shape: Vec<u64>,
        out: u64,
        rel: f64,
    ) -> TensorReport {
        let n: u64 = shape.iter().product();
        TensorReport {
            name: name.into(),
            shard: shard.into(),
            action: action.into(),
            detail: "int8 sym channel".into(),
            dtype: "BF16".into(),
            shape,
            bytes_in: 2 * n,
            bytes_out: out,
            outputs: vec![name.into()],
            pruned: None,
            error: ErrorSummary {
                rel_error: rel,
                mse: rel * rel,
                snr_db: (rel > 0.0).then(|| -20.0 * rel.log10()),
                max_abs_error: rel,
            },
        }
    }

    fn report() -> Report {
        let recipe = Recipe::load("w8a16").expect("preset");
        let mut r = Report {
            report_version: REPORT_VERSION,
            shardpress_version: "test".into(),
            recipe_name: "w8a16".into(),
            recipe: recipe.source.clone(),
            totals: Totals::default(),
            shards: vec![
                ShardReport {
                    file: "a.safetensors".into(),
                    group: "model.layers.0".into(),
                    tensors: 2,
                    file_bytes: 0,
                },
                ShardReport {
                    file: "b.safetensors".into(),
                    group: "model.<b>&\"layers\".1".into(),
                    tensors: 1,
                    file_bytes: 0,
                },
            ],
            tensors: vec![
                tensor(
                    "model.layers.0.q.weight",
                    "a.safetensors",
                    "quantize",
                    vec![64, 64],
                    4096 + 128,
                    0.01,
                ),
                tensor(
                    "model.layers.0.norm.weight",
                    "a.safetensors",
                    "keep",
                    vec![64],
                    128,
                    0.0,
                ),
                tensor(
                    "<script>alert(1)</script>|x",
                    "b.safetensors",
                    "quantize",
                    vec![32, 64],
                    2048 + 64,
                    0.02,
                ),
            ],
            copied_files: vec![],
            skipped_files: vec![],
            structured: None,
        };
        r.compute_totals();
        r
    }

    #[test]
    fn layer_sizes_add_up_to_the_totals() {
        let r = report();
        let layers = layer_sizes(&r);
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].group, "model.layers.0");
        assert_eq!(layers[0].bytes_in, 2 * (64 * 64 + 64));
        assert_eq!(layers[0].bytes_out, 4096 + 128 + 128);
        let (bin, bout) = layers
            .iter()
            .fold((0, 0), |(a, b), l| (a + l.bytes_in, b + l.bytes_out));
        assert_eq!((bin, bout), (r.totals.bytes_in, r.totals.bytes_out));
        assert!((bits_per_weight(&r.tensors[0]) - (4224.0 * 8.0 / 4096.0)).abs() < 1e-12);
    }

    #[test]
    fn markdown_lists_every_layer_and_transformed_tensor_once() {
        let md = to_markdown(&report());
        assert!(md.starts_with("# Compression report: recipe `w8a16`"));
        assert_eq!(md.matches("| `model.layers.0.q.weight` |").count(), 1);
        assert!(!md.contains("norm.weight"), "kept tensors are not listed");
        // A pipe in a name cannot break the table.
        assert!(md.contains("<script>alert(1)</script>\\|x"));
        assert!(
            md.contains("| model.layers.0 | 8.1 KiB | 4.2 KiB |"),
            "{md}"
        );
        assert!(md.contains("1 tensor(s) kept unchanged"));
    }

    #[test]
    fn html_has_three_charts_escapes_names_and_loads_nothing() {
        let html = to_html(&report());
        for id in ["size-per-layer", "error-per-tensor", "error-vs-bits"] {
            assert_eq!(
                html.matches(&format!("<figure id=\"{id}\"")).count(),
                1,
                "{id}"
            );
        }
        assert!(!html.contains("<script"), "names are escaped");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;|x"));
        assert!(html.contains("model.&lt;b&gt;&amp;&quot;layers&quot;.1"));
        // Two layer groups with two bars each, two error bars, two points.
        assert_eq!(html.matches("class=\"bar\"").count(), 6);
        assert_eq!(html.matches("class=\"point\"").count(), 2);
        let outside = html.replace("http://www.w3.org/2000/svg", "");
        assert!(!outside.contains("http"), "self-contained");
        assert_eq!(html, to_html(&report()), "deterministic");
    }

    #[test]
    fn many_tensors_chart_the_largest_error_per_layer_group() {
        let mut r = report();
        let base = r.tensors[0].clone();
        r.tensors = (0..MAX_TENSOR_BARS + 1)
            .map(|i| {
                let mut t = base.clone();
                t.name = format!("t{i}");
                t.error.rel_error = i as f64;
                t
            })
            .collect();
        let rows = error_rows(&r);
        assert_eq!(
            rows,
            vec![("model.layers.0".to_string(), vec![MAX_TENSOR_BARS as f64])]
        );
        assert!(to_html(&r).contains("Largest relative error per layer group"));
    }

    #[test]
    fn names_with_backticks_stay_one_code_span() {
        assert_eq!(code("a.weight"), "`a.weight`");
        assert_eq!(code("a|b`c`.weight"), "`` a\\|b`c`.weight ``");
    }

    #[test]
    fn long_labels_keep_their_end() {
        let long = "model.layers.10.self_attn.q_proj.weight.something.longer.than.fits";
        let s = shorten(long);
        assert_eq!(s.chars().count(), LABEL_CHARS);
        assert!(s.starts_with('…') && s.ends_with("than.fits"));
        assert_eq!(shorten("short"), "short");
    }
}
