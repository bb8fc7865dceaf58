//! Prometheus text exposition helpers: the [`MetricsSource`] trait each part
//! of the daemon implements beside what it counts, and the writers of
//! families and samples. No dependencies on the rest of the crate, so any
//! layer may expose metrics; the API only concatenates the sources.

use std::fmt::Write as _;

use async_trait::async_trait;

/// Something that adds lines to the exposition.
#[async_trait]
pub trait MetricsSource: Send + Sync {
    /// Appends `# HELP`/`# TYPE` headers and samples to `out`.
    async fn render(&self, out: &mut String);
}

/// Writes one metric family with a single unlabelled sample.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// Writes a family header; samples follow with [`sample`].
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one labelled sample. Label values here are validated names
/// (`[a-z0-9-]`), so they need no escaping.
pub fn sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Writes one histogram series under `labels`: the cumulative
/// `_bucket{le}` samples for `bounds` (`counts` holds one count per bound
/// and then those above the last), `+Inf`, `_sum` when there is one, and
/// `_count`.
pub fn histogram(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    bounds: &[f64],
    counts: &[u64],
    sum: Option<f64>,
) {
    let bucket = format!("{name}_bucket");
    let with_le = |le: &str, out: &mut String, n: u64| {
        let mut l: Vec<(&str, &str)> = labels.to_vec();
        l.push(("le", le));
        sample(out, &bucket, &l, n);
    };
    let mut cumulative = 0u64;
    for (b, n) in bounds.iter().zip(counts) {
        cumulative += n;
        with_le(&b.to_string(), out, cumulative);
    }
    cumulative += counts.get(bounds.len()).copied().unwrap_or(0);
    with_le("+Inf", out, cumulative);
    if let Some(sum) = sum {
        sample(out, &format!("{name}_sum"), labels, sum);
    }
    sample(out, &format!("{name}_count"), labels, cumulative);
}
