//! Timing shared by the kernels' benchmarks.

use std::time::Instant;

/// The median of `reps` timed calls of `f`, after one untimed call.
pub fn median_seconds(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
