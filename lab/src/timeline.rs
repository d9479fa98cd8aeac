//! A picture of a run: every client's ping replies as ticks along a time axis, one row per
//! client, with what happened (a gateway killed) as vertical lines. A failover shows as a gap in
//! its clients' rows.

use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One row: a client's name and when its replies came.
pub struct Row {
    pub name: String,
    pub replies: Vec<SystemTime>,
}

/// Writes the timeline as SVG: seconds since `start` along x, `rows` top to bottom, `events`
/// (when, what) as labelled vertical lines.
pub fn write_svg(
    path: &Path,
    title: &str,
    start: SystemTime,
    rows: &[Row],
    events: &[(SystemTime, String)],
) -> Result<()> {
    let seconds = |at: &SystemTime| at.duration_since(start).unwrap_or_default().as_secs_f64();
    let end = rows
        .iter()
        .flat_map(|r| r.replies.iter().map(seconds))
        .chain(events.iter().map(|(at, _)| seconds(at)))
        .fold(1.0, f64::max);
    let height = 120 + 40 * rows.len() as u32;
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(110)
        .build_cartesian_2d(0f64..end * 1.02, -0.5f64..rows.len() as f64 - 0.5)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("seconds")
        .y_labels(rows.len())
        .y_label_formatter(&|y| {
            let row = y.round();
            if (y - row).abs() < 0.01 && row >= 0.0 {
                names.get(row as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()?;
    let blue = RGBColor(31, 119, 180);
    for (i, row) in rows.iter().enumerate() {
        let y = i as f64;
        chart.draw_series(row.replies.iter().map(|at| {
            let x = seconds(at);
            PathElement::new(vec![(x, y - 0.3), (x, y + 0.3)], blue.stroke_width(1))
        }))?;
    }
    let red = RGBColor(214, 39, 40);
    for (at, what) in events {
        let x = seconds(at);
        let top = rows.len() as f64 - 0.5;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, -0.5), (x, top)],
            red.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            what.clone(),
            (x, top - 0.1),
            ("sans-serif", 14).into_font().color(&red),
        )))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
