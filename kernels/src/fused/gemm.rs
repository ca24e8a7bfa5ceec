//! Safe strided matrix views over `f32` slices and one product on top of the `gemm` crate
//! (the same micro-kernels candle's CPU matmul runs).
//!
//! The engine's activations live in reused buffers, so its products read and write
//! sub-blocks of them in place: a view carries row and column strides, `t()` swaps them, and
//! [`matmul`] checks that every element it may touch lies inside the slice before it hands
//! raw pointers to `gemm`.

/// How many threads one product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// The calling thread only (inside a task that is already one of many).
    Seq,
    /// The rayon pool (a product over all tokens).
    Pool,
}

impl Par {
    fn get(self) -> gemm::Parallelism {
        match self {
            Par::Seq => gemm::Parallelism::None,
            Par::Pool => match rayon::current_num_threads() {
                0 | 1 => gemm::Parallelism::None,
                n => gemm::Parallelism::Rayon(n),
            },
        }
    }
}

/// A read-only `rows × cols` view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable `rows × cols` view with the same addressing as [`MatRef`].
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Whether a view of this shape and these strides stays inside `len` elements (computed
/// without overflow: a wrapped product must not pass for a small one).
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(rs).and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
    last.is_some_and(|last| last < len)
}

/// Whether distinct elements of a view have distinct positions (needed for a view that is
/// written, possibly by several threads): rows of `cols` elements `cs` apart that do not
/// reach the next row, or the same with rows and columns swapped.
fn distinct(rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    let spans = |n: usize, step: usize, next: usize| {
        n <= 1 || n.checked_mul(step).is_some_and(|span| step >= 1 && span <= next)
    };
    rows == 0
        || cols == 0
        || rows <= 1 && (cols <= 1 || cs >= 1)
        || cols <= 1 && rs >= 1
        || spans(cols, cs, rs) && rs >= 1
        || spans(rows, rs, cs) && cs >= 1
}

/// The start of block `(r0, c0)` of a row-major matrix whose rows are `ld` apart, checking
/// that the block's columns stay inside a row.
fn block_start(ld: usize, r0: usize, c0: usize, n: usize) -> usize {
    assert!(c0.checked_add(n).is_some_and(|end| end <= ld), "block columns {c0}..{c0}+{n} outside rows of {ld}");
    r0.checked_mul(ld).and_then(|s| s.checked_add(c0)).expect("block offset overflows")
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows × cols` matrix at the start of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides. Panics if it does not fit in `data` (a programming
    /// error of the engine, never user input).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "matrix view {rows}x{cols} (strides {rs},{cs}) outside {}",
            data.len()
        );
        Self { data, rows, cols, rs, cs }
    }

    /// Columns `c0..c0 + n` of a row-major matrix whose rows are `ld` apart, rows `r0..r0 + m`.
    pub fn block(data: &'a [f32], ld: usize, r0: usize, m: usize, c0: usize, n: usize) -> Self {
        let start = block_start(ld, r0, c0, n).min(data.len());
        Self::strided(&data[start..], m, n, ld, 1)
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, data: self.data }
    }

    /// Rows `r0..r0 + m` and columns `c0..c0 + n` of this view.
    pub fn sub(self, r0: usize, m: usize, c0: usize, n: usize) -> Self {
        assert!(r0 + m <= self.rows && c0 + n <= self.cols, "sub-view outside {}x{}", self.rows, self.cols);
        // In bounds of a view that fits, so neither product overflows.
        let start = (r0 * self.rs + c0 * self.cs).min(self.data.len());
        Self::strided(&self.data[start..], m, n, self.rs, self.cs)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance between the elements of a row.
    pub fn col_stride(&self) -> usize {
        self.cs
    }

    /// Row `i` as a slice; the view's columns must be adjacent.
    pub fn row(&self, i: usize) -> &'a [f32] {
        assert!(
            i < self.rows && (self.cs == 1 || self.cols <= 1),
            "row {i} of a {}x{} view with column stride {}",
            self.rows,
            self.cols,
            self.cs
        );
        &self.data[i * self.rs..i * self.rs + self.cols]
    }
}

impl<'a> MatMut<'a> {
    /// A dense row-major `rows × cols` matrix at the start of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides; panics if it does not fit in `data` or if two of its
    /// elements would share a position (a written view must not alias itself).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(distinct(rows, cols, rs, cs), "writable view {rows}x{cols} (strides {rs},{cs}) overlaps itself");
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "matrix view {rows}x{cols} (strides {rs},{cs}) outside {}",
            data.len()
        );
        Self { data, rows, cols, rs, cs }
    }

    /// Columns `c0..c0 + n`, rows `r0..r0 + m` of a row-major matrix whose rows are `ld` apart.
    pub fn block(data: &'a mut [f32], ld: usize, r0: usize, m: usize, c0: usize, n: usize) -> Self {
        let start = block_start(ld, r0, c0, n).min(data.len());
        Self::strided(&mut data[start..], m, n, ld, 1)
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, data: self.data }
    }

    /// Adds `v` (one value per column) to every row: a frozen bias.
    pub fn add_row_vector(&mut self, v: &[f32]) {
        assert_eq!(v.len(), self.cols, "bias of {} values for {} columns", v.len(), self.cols);
        for i in 0..self.rows {
            for (j, &b) in v.iter().enumerate() {
                self.data[i * self.rs + j * self.cs] += b;
            }
        }
    }

    /// Rows `r0..r0 + m` and columns `c0..c0 + n` of this view.
    pub fn sub(&mut self, r0: usize, m: usize, c0: usize, n: usize) -> MatMut<'_> {
        assert!(r0 + m <= self.rows && c0 + n <= self.cols, "sub-view outside {}x{}", self.rows, self.cols);
        // In bounds of a view that fits, so neither product overflows.
        let start = (r0 * self.rs + c0 * self.cs).min(self.data.len());
        MatMut::strided(&mut self.data[start..], m, n, self.rs, self.cs)
    }

    /// A shorter-lived view of the same elements (to pass to [`matmul`] and keep this one).
    pub fn rb(&mut self) -> MatMut<'_> {
        MatMut { data: self.data, rows: self.rows, cols: self.cols, rs: self.rs, cs: self.cs }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance between the starts of two rows.
    pub fn row_stride(&self) -> usize {
        self.rs
    }

    /// Distance between the elements of a row.
    pub fn col_stride(&self) -> usize {
        self.cs
    }

    /// The first element, for a kernel that writes inside the view (every element it
    /// writes, `(i, j)` at `i·rs + j·cs`, lies inside the slice: the view was checked).
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.data.as_mut_ptr()
    }

    /// The same elements, read-only.
    pub fn as_ref(&self) -> MatRef<'_> {
        MatRef { data: self.data, rows: self.rows, cols: self.cols, rs: self.rs, cs: self.cs }
    }
}

/// `dst = (accumulate ? dst : 0) + alpha · a · b`.
///
/// Panics on mismatched shapes (an engine bug). With `accumulate == false` the previous
/// contents of `dst` are never read, so it may hold garbage from an earlier use.
pub fn matmul(dst: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, alpha: f32, accumulate: bool, par: Par) {
    assert!(
        a.cols == b.rows && dst.rows == a.rows && dst.cols == b.cols,
        "matmul shapes: {}x{} = {}x{} · {}x{}",
        dst.rows,
        dst.cols,
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.data[i * dst.rs + j * dst.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: `fits` was checked (without overflow) for all three views when they were made,
    // so every index (i·rs + j·cs) the product touches is inside its slice; `dst` was checked
    // to give distinct elements distinct positions, so the threads of the product never write
    // one element twice; it is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par.get(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn products_of_views_transposes_blocks_and_accumulation() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut out = vec![f32::NAN; m * n];
        matmul(MatMut::new(&mut out, m, n), MatRef::new(&a, m, k), MatRef::new(&b, k, n), 1.0, false, Par::Pool);
        for (x, y) in out.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // bᵀ stored as n×k, read through t(); accumulate twice the product into a block of a wider buffer.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut wide = vec![1f32; m * 10];
        matmul(
            MatMut::block(&mut wide, 10, 0, m, 4, n),
            MatRef::new(&a, m, k),
            MatRef::new(&bt, n, k).t(),
            2.0,
            true,
            Par::Seq,
        );
        for i in 0..m {
            for j in 0..10 {
                let expect = if (4..4 + n).contains(&j) { 1.0 + 2.0 * want[i * n + j - 4] } else { 1.0 };
                assert!((wide[i * 10 + j] - expect).abs() < 1e-5, "({i},{j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_view_past_its_slice_is_refused() {
        let a = vec![0f32; 10];
        let _ = MatRef::new(&a, 3, 4);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_stride_that_overflows_is_refused() {
        let a = vec![0f32; 4];
        let _ = MatRef::strided(&a, 3, 1, 1 << 63, 1);
    }

    #[test]
    #[should_panic(expected = "overlaps itself")]
    fn a_writable_view_that_overlaps_itself_is_refused() {
        let mut a = vec![0f32; 4096];
        let _ = MatMut::strided(&mut a, 512, 512, 1, 1);
    }

    #[test]
    #[should_panic(expected = "outside rows")]
    fn a_block_wider_than_its_rows_is_refused() {
        let a = vec![0f32; 64];
        let _ = MatRef::block(&a, 2, 0, 3, 0, 4);
    }

    #[test]
    fn transposed_and_single_row_views_are_distinct() {
        let mut a = vec![0f32; 12];
        let _ = MatMut::new(&mut a, 3, 4).t();
        let _ = MatMut::strided(&mut a, 4, 3, 1, 4);
        let _ = MatMut::strided(&mut a, 1, 12, 0, 1);
    }
}
