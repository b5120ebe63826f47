use super::*;

#[test]
fn blocks_cover_touched_extents() {
    let b = BLOCK_SIZE;
    let r = block_ranges([
        Extent::new(0, 512),
        Extent::new(b - 512, 1024),
        Extent::new(10 * b, b),
        Extent::new(3 * b + 4096, 0),
    ]);
    assert_eq!(r, vec![(0, 2), (10, 11)]);
    assert_eq!(volume_gib(1), 1);
    assert_eq!(volume_gib(1 << 30), 1);
    assert_eq!(volume_gib((1 << 30) + 512), 2);
}
