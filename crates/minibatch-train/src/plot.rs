//! SVG plots with plotters' SVG backend (text is emitted as SVG `<text>`
//! elements; no system fonts are read).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::history::History;

/// One named line: `(x, y)` points.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points in drawing order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series from a name and points.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

fn perr<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Plot(e.to_string())
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn bounds(series: &[Series], log_y: bool) -> Option<(f64, f64, f64, f64)> {
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0));
    let mut b: Option<(f64, f64, f64, f64)> = None;
    for &(x, y) in pts {
        b = Some(match b {
            None => (x, x, y, y),
            Some((a, bb, c, d)) => (a.min(x), bb.max(x), c.min(y), d.max(y)),
        });
    }
    b.map(|(x0, x1, y0, y1)| {
        let (x0, x1) = if x1 > x0 {
            (x0, x1)
        } else {
            (x0 - 0.5, x0 + 0.5)
        };
        let (y0, y1) = if y1 > y0 {
            (y0, y1)
        } else if log_y {
            (y0 / 2.0, y0 * 2.0)
        } else {
            (y0 - 0.5, y0 + 0.5)
        };
        (x0, x1, y0, y1)
    })
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let Some((x0, x1, y0, y1)) = bounds(series, log_y) else {
        return Ok(());
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60);
    macro_rules! finish {
        ($chart:ident) => {{
            $chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .draw()
                .map_err(perr)?;
            for (i, s) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let pts = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0));
                $chart
                    .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                    .map_err(perr)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            $chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(perr)?;
        }};
    }
    if log_y {
        let mut chart = builder
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(perr)?;
        finish!(chart);
    } else {
        let pad = (y1 - y0) * 0.05;
        let mut chart = builder
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(perr)?;
        finish!(chart);
    }
    Ok(())
}

/// Draws one chart of several lines into an SVG file.
///
/// ```
/// use minibatch_train::plot::{plot_lines, Series};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("loss.svg");
/// plot_lines(&path, "loss", "step", "loss", &[Series::new("sgd", vec![(0.0, 2.0), (1.0, 1.0)])], false)?;
/// assert!(std::fs::read_to_string(&path)?.contains("<svg"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        draw_panel(&root, title, x_label, y_label, series, log_y)?;
        root.present().map_err(perr)?;
    }
    Ok(())
}

/// Draws a history's per-epoch loss (train/val) and metrics (train/val) side
/// by side into an SVG file.
pub fn plot_history(history: &History, path: &Path) -> Result<()> {
    let ep = |f: &dyn Fn(&crate::history::EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .epochs
            .iter()
            .filter_map(|e| f(e).map(|v| ((e.epoch + 1) as f64, v)))
            .collect()
    };
    let mut losses = vec![Series::new("train loss", ep(&|e| Some(e.train_loss)))];
    let val = ep(&|e| e.val_loss);
    if !val.is_empty() {
        losses.push(Series::new("val loss", val));
    }
    let mut names: Vec<String> = Vec::new();
    for e in &history.epochs {
        for k in e.train_metrics.keys().chain(e.val_metrics.keys()) {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let mut metrics = Vec::new();
    for n in &names {
        let t = ep(&|e| e.train_metrics.get(n).copied());
        if !t.is_empty() {
            metrics.push(Series::new(format!("train {n}"), t));
        }
        let v = ep(&|e| e.val_metrics.get(n).copied());
        if !v.is_empty() {
            metrics.push(Series::new(format!("val {n}"), v));
        }
    }
    {
        let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        let (left, right) = root.split_horizontally(600);
        draw_panel(&left, "loss per epoch", "epoch", "loss", &losses, false)?;
        draw_panel(
            &right,
            "metrics per epoch",
            "epoch",
            "value",
            &metrics,
            false,
        )?;
        root.present().map_err(perr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::EpochRecord;

    #[test]
    fn history_plot_contains_text_and_lines() {
        let mut h = History::default();
        for e in 0..3u64 {
            let mut r = EpochRecord {
                epoch: e,
                train_loss: 1.0 / (e + 1) as f64,
                val_loss: Some(1.2 / (e + 1) as f64),
                ..Default::default()
            };
            r.val_metrics
                .insert("accuracy".into(), 0.5 + 0.1 * e as f64);
            h.epochs.push(r);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.svg");
        plot_history(&h, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("<text"), "labels must be SVG text");
        assert!(svg.contains("val accuracy"));
        assert!(svg.contains("<polyline"));
        let q = dir.path().join("log.svg");
        plot_lines(
            &q,
            "t",
            "x",
            "y",
            &[Series::new("a", vec![(0.0, 10.0), (1.0, 0.1)])],
            true,
        )
        .unwrap();
        assert!(std::fs::read_to_string(&q).unwrap().contains("<polyline"));
    }
}
