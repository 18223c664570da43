//! Launch geometry shared by every kernel.
//!
//! Runtimes cap each grid axis (65535 cubes on wgpu), so a kernel that needs `n` cubes gets an
//! `x * y` grid with `x <= 65535` and reads its flat cube index back with [`cube_index`](fn@cube_index); cubes
//! past `n` (the ragged end of the last row) see an index `>= n` and do nothing. Kernels that map
//! one thread to one work item use [`thread_index`](fn@thread_index) the same way.

use cubecl::prelude::*;

/// Largest cube count along one grid axis that every runtime accepts.
pub const MAX_GRID_AXIS: usize = 65_535;

/// Threads per cube of the one-item-per-thread kernels.
pub const THREADS_1D: u32 = 64;

/// A grid of at least `cubes` cubes (never zero: a launch over nothing still needs one cube,
/// which then finds its index out of range).
pub fn grid(cubes: usize) -> CubeCount {
    let cubes = cubes.max(1);
    let x = cubes.min(MAX_GRID_AXIS);
    let y = cubes.div_ceil(x);
    assert!(y <= MAX_GRID_AXIS, "grid of {cubes} cubes is too large");
    CubeCount::Static(x as u32, y as u32, 1)
}

/// Grid and cube shape for `items` independent work items, one per thread.
pub fn per_item(items: usize) -> (CubeCount, CubeDim) {
    (
        grid(items.div_ceil(THREADS_1D as usize)),
        CubeDim::new_1d(THREADS_1D),
    )
}

/// Flat index of this cube in a [`grid`].
#[cube]
pub fn cube_index() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// Flat index of this thread in a [`per_item`] launch (1-D cubes).
#[cube]
pub fn thread_index() -> usize {
    cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize
}
