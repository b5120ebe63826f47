use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn obj(offset: u64, length: u64) -> DataObject {
    DataObject {
        offset,
        length,
        encoding: Encoding::Raw,
        stored_length: length,
        sha256: Sha256Hex([7; 32]),
        pieces: Vec::new(),
    }
}

fn manifest() -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        disk: DiskId::new("s", "v", "d").unwrap(),
        generation: 2,
        parent: Some(1),
        disk_size: 64 * MIB,
        max_object: DEFAULT_MAX_OBJECT,
        source_kind: "extent-list".into(),
        source_change_id: Some("52 de 8f/12".into()),
        snapshot_time: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        consistency: Consistency::Crash,
        objects: vec![obj(0, MIB), obj(4 * MIB, 8 * MIB)],
        zero_ranges: vec![Extent::new(MIB, MIB), Extent::new(60 * MIB, 4 * MIB)],
        created_by: "test".into(),
    }
}

fn reject(f: impl FnOnce(&mut Manifest)) -> ManifestError {
    let mut m = manifest();
    f(&mut m);
    let err = m.validate().expect_err("should be rejected");
    // The same rejection comes through the JSON path.
    assert_eq!(Manifest::from_json(&m.to_json()).unwrap_err(), err);
    err
}

#[test]
fn consistency_names_are_the_manifests() {
    for c in [Consistency::Crash, Consistency::Application] {
        assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
    }
}

#[test]
fn a_new_manifest_is_valid() {
    let m = Manifest::new(
        DiskId::new("s", "v", "d").unwrap(),
        3,
        Some(2),
        64 * MIB,
        DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        "extent-list",
    );
    assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
}

#[test]
fn valid_round_trips() {
    let m = manifest();
    m.validate().unwrap();
    assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
    assert_eq!(m.data_bytes(), 9 * MIB);
    assert_eq!(m.zero_bytes(), 5 * MIB);
}

#[test]
fn rejections() {
    assert!(matches!(
        reject(|m| m.generation = 0),
        ManifestError::GenerationZero(_)
    ));
    assert!(matches!(
        reject(|m| m.parent = Some(2)),
        ManifestError::ParentNotOlder { .. }
    ));
    assert!(matches!(
        reject(|m| m.disk_size = 1000),
        ManifestError::BadDiskSize(_)
    ));
    assert!(matches!(
        reject(|m| m.max_object = 1 << 30),
        ManifestError::BadMaxObject(_)
    ));
    assert!(matches!(
        reject(|m| m.objects[0].offset = 100),
        ManifestError::Unaligned { .. }
    ));
    assert!(matches!(
        reject(|m| m.objects[0].length = 0),
        ManifestError::Empty { .. }
    ));
    assert!(matches!(
        reject(|m| m.objects[1].offset = 60 * MIB),
        ManifestError::PastEnd { .. }
    ));
    assert!(matches!(
        reject(|m| m.objects[1].offset = u64::MAX - 511),
        ManifestError::PastEnd { .. }
    ));
    assert!(matches!(
        reject(|m| {
            m.objects[1].length = 16 * MIB;
            m.objects[1].stored_length = 16 * MIB;
        }),
        ManifestError::TooLong { .. }
    ));
    assert!(matches!(
        reject(|m| m.objects.swap(0, 1)),
        ManifestError::Overlap { .. }
    ));
    assert!(matches!(
        reject(|m| m.objects.push(obj(4 * MIB + 512, 512))),
        ManifestError::Overlap { .. }
    ));
    assert!(matches!(
        reject(|m| m.zero_ranges[0] = Extent::new(MIB / 2, MIB)),
        ManifestError::ZeroOverlapsData { .. }
    ));
    assert!(matches!(
        reject(|m| m.zero_ranges.reverse()),
        ManifestError::Overlap { .. }
    ));
    assert!(matches!(
        reject(|m| m.objects[0].stored_length = 5),
        ManifestError::BadStoredLength { .. }
    ));
    assert!(matches!(
        reject(|m| {
            m.objects[0].encoding = Encoding::Zstd;
            m.objects[0].stored_length = 2 * MIB;
        }),
        ManifestError::BadStoredLength { .. }
    ));
    assert!(matches!(
        reject(|m| m.source_change_id = Some("a\nb".into())),
        ManifestError::BadField { .. }
    ));
}

#[test]
fn unknown_version_and_garbage() {
    let mut v: serde_json::Value = serde_json::from_slice(&manifest().to_json()).unwrap();
    for unknown in [0, 3, 1000] {
        v["format_version"] = unknown.into();
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            Manifest::from_json(&bytes),
            Err(ManifestError::UnsupportedVersion(unknown))
        );
    }
    v["format_version"] = 1.into();
    v["surprise"] = 1.into();
    assert!(matches!(
        Manifest::from_json(&serde_json::to_vec(&v).unwrap()),
        Err(ManifestError::Json(_))
    ));
    v["surprise"].take();
    let mut v2 = v.clone();
    v2.as_object_mut().unwrap().remove("surprise");
    v2["objects"][0]["sha256"] = "ABC".into();
    assert!(matches!(
        Manifest::from_json(&serde_json::to_vec(&v2).unwrap()),
        Err(ManifestError::Json(_))
    ));
    v2["objects"][0]["sha256"] = "7".repeat(64).into();
    v2["disk"]["vm"] = "..".into();
    assert!(matches!(
        Manifest::from_json(&serde_json::to_vec(&v2).unwrap()),
        Err(ManifestError::Json(_))
    ));
    assert!(Manifest::from_json(b"").is_err());
    assert!(Manifest::from_json(b"{}").is_err());
    assert!(Manifest::from_json(b"[1,2]").is_err());
}

#[test]
fn key_mismatch() {
    let m = manifest();
    let other = ObjectKey::Manifest {
        disk: m.disk.clone(),
        generation: 3,
    };
    assert!(matches!(
        m.check_key(&other),
        Err(ManifestError::KeyMismatch { .. })
    ));
    let same = ObjectKey::Manifest {
        disk: m.disk.clone(),
        generation: 2,
    };
    m.check_key(&same).unwrap();
}

/// Builds a random valid manifest from a list of (gap, len, is_zero) sectors.
fn arb_manifest() -> impl Strategy<Value = Manifest> {
    proptest::collection::vec((0u64..64, 1u64..64, any::<bool>()), 0..40).prop_map(|runs| {
        let mut m = manifest();
        m.objects.clear();
        m.zero_ranges.clear();
        m.max_object = 64 * 512;
        let mut pos = 0;
        for (gap, len, zero) in runs {
            let e = Extent::new((pos + gap) * 512, len * 512);
            pos += gap + len;
            if zero {
                m.zero_ranges.push(e);
            } else {
                m.objects.push(obj(e.offset, e.length));
            }
        }
        m.disk_size = (pos + 1) * 512;
        m
    })
}

fn packed(offset: u64, pieces: &[(u64, u64)]) -> DataObject {
    let pieces: Vec<Extent> = pieces.iter().map(|&(o, l)| Extent::new(o, l)).collect();
    let length = pieces.iter().map(|p| p.length).sum();
    DataObject {
        offset,
        pieces,
        ..obj(offset, length)
    }
}

fn packed_manifest() -> Manifest {
    let mut m = manifest();
    m.format_version = 2;
    m.objects = vec![
        packed(
            0,
            &[(0, 64 << 10), (2 * MIB, 128 << 10), (5 * MIB, 64 << 10)],
        ),
        obj(6 * MIB, MIB),
        // Interleaves with nothing, overlaps nothing: fine.
        packed(10 * MIB, &[(10 * MIB, 512), (12 * MIB, 4096)]),
    ];
    m.zero_ranges = vec![Extent::new(MIB, MIB)];
    m
}

#[test]
fn packed_objects_need_v2_and_validate_piece_by_piece() {
    let m = packed_manifest();
    m.validate().unwrap();
    assert_eq!(m.required_version(), 2);
    assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
    let parts: Vec<Extent> = m.objects[0].parts().collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(
        m.objects[1].parts().collect::<Vec<_>>(),
        [Extent::new(6 * MIB, MIB)]
    );
    // A manifest without packed objects is still written as v1 (old receivers read it).
    assert_eq!(manifest().required_version(), 1);

    let reject = |f: &dyn Fn(&mut Manifest)| {
        let mut m = packed_manifest();
        f(&mut m);
        m.validate().unwrap_err()
    };
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("v1 with pieces", Box::new(|m| m.format_version = 1)),
        (
            "first piece elsewhere",
            Box::new(|m| m.objects[0].offset = 512),
        ),
        (
            "lengths do not add up",
            Box::new(|m| m.objects[0].length += 512),
        ),
        (
            "pieces out of order",
            Box::new(|m| m.objects[0].pieces.swap(1, 2)),
        ),
        (
            "piece unaligned",
            Box::new(|m| m.objects[2].pieces[1].length = 100),
        ),
        (
            "piece past the end",
            Box::new(|m| m.objects[2].pieces[1].offset = m.disk_size),
        ),
        (
            "piece overlaps another object",
            Box::new(|m| m.objects[0].pieces[2].offset = 6 * MIB),
        ),
        (
            "piece overlaps a zero range",
            Box::new(|m| m.objects[0].pieces[1].offset = MIB),
        ),
        (
            "longer than max_object",
            Box::new(|m| {
                m.max_object = 128 << 10;
                m.objects[1] = obj(6 * MIB, 128 << 10);
            }),
        ),
        (
            "empty piece",
            Box::new(|m| {
                m.objects[2].pieces[1].length = 0;
                m.objects[2].length = 512;
            }),
        ),
    ];
    for (what, edit) in cases {
        let e = reject(&*edit);
        assert!(!e.to_string().is_empty(), "{what}");
    }
}

proptest! {
    #[test]
    fn arbitrary_packings_never_panic_and_valid_ones_round_trip(
        objs in prop::collection::vec(
            (0u64..64, prop::collection::vec((0u64..64, 0u64..4), 0..5), any::<bool>()),
            0..6,
        ),
        zeros in prop::collection::vec((0u64..64, 1u64..4), 0..3),
    ) {
        let mut m = manifest();
        m.format_version = 2;
        m.disk_size = 64 * 4096;
        m.max_object = 8 * 4096;
        m.objects = objs.iter().map(|(off, pieces, shift)| {
            let pieces: Vec<(u64, u64)> = pieces.iter().map(|&(o, l)| (o * 4096, l * 4096)).collect();
            let mut o = packed(off * 4096 + u64::from(*shift), &pieces);
            if pieces.is_empty() {
                o.length = 4096;
            }
            o
        }).collect();
        m.zero_ranges = zeros.iter().map(|&(o, l)| Extent::new(o * 4096, l * 4096)).collect();
        if m.validate().is_ok() {
            prop_assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        }
    }

    #[test]
    fn generated_manifests_validate_and_round_trip(m in arb_manifest()) {
        m.validate().unwrap();
        prop_assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn shifting_an_extent_by_a_byte_is_rejected(m in arb_manifest(), pick: prop::sample::Index) {
        prop_assume!(!m.objects.is_empty());
        let mut m = m;
        let i = pick.index(m.objects.len());
        m.objects[i].offset += 1;
        prop_assert!(m.validate().is_err());
    }

    #[test]
    fn shrinking_the_disk_below_an_extent_is_rejected(m in arb_manifest()) {
        let last = m.objects.iter().map(|o| o.extent().end())
            .chain(m.zero_ranges.iter().map(|z| z.end())).max();
        prop_assume!(last.is_some());
        let mut m = m;
        m.disk_size = last.unwrap_or(0) - 512;
        prop_assume!(m.disk_size > 0);
        prop_assert!(m.validate().is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Manifest::from_json(&bytes);
    }

    #[test]
    fn arbitrary_json_text_never_panics(s in r#"\{"format_version":1,[ -~]{0,200}\}"#) {
        let _ = Manifest::from_json(s.as_bytes());
    }
}
