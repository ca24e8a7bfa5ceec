//! `loss.png`: training loss per logged step and eval loss, drawn with plotters into a
//! pixel buffer and encoded with the png crate (no system fonts: DejaVu Sans is embedded).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Draws `(step, loss)` series and writes a PNG atomically.
pub fn loss_curve(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> Result<()> {
    let (w, h) = (900u32, 540u32);
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let all = train.iter().chain(eval);
        let max_x = all.clone().map(|p| p.0).fold(1.0, f64::max);
        let max_y = all.map(|p| p.1).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-3) * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption("lorafleet: loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y)
            .map_err(|e| anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart.draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled()))).map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    lorafleet_common::atomic::write_file(path, &png_bytes)?;
    Ok(())
}
