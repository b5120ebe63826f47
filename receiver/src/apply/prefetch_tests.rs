use super::*;
use crate::image::FileImage;
use chrono::DateTime;
use pilotlight_cloud::MemoryStore;
use pilotlight_protocol::{
    Consistency, DiskId, Encoding, Sha256Hex, FORMAT_VERSION, MAX_OBJECT_LIMIT,
};

fn setup(dir: &Path) -> (MemoryStore, Manifest, String, Vec<u8>) {
    let data = vec![7u8; 4096];
    let m = Manifest {
        format_version: FORMAT_VERSION,
        disk: DiskId::new("s", "v", "d").unwrap(),
        generation: 1,
        parent: None,
        disk_size: 65536,
        max_object: 65536,
        source_kind: "test".into(),
        source_change_id: None,
        snapshot_time: DateTime::from_timestamp(0, 0).unwrap(),
        consistency: Consistency::Crash,
        objects: vec![DataObject {
            offset: 8192,
            length: 4096,
            encoding: Encoding::Raw,
            stored_length: 4096,
            sha256: Sha256Hex(Sha256::digest(&data).into()),
            pieces: Vec::new(),
        }],
        zero_ranges: vec![],
        created_by: "test".into(),
    };
    let key = ObjectKey::Data {
        disk: m.disk.clone(),
        generation: 1,
        offset: 8192,
    }
    .to_key(&Prefix::new("p").unwrap());
    let src = MemoryStore::default();
    src.insert(&key, data.clone());
    std::fs::create_dir_all(dir.join("prefetch")).unwrap();
    (src, m, key, data)
}

fn opts(dir: &Path) -> ApplyOptions {
    ApplyOptions {
        concurrency: 2,
        staging_dir: dir.to_path_buf(),
        image_name: "test".into(),
        prefetch_dir: Some(dir.join("prefetch")),
        budget: Default::default(),
    }
}

#[tokio::test]
async fn a_prefetched_copy_is_used_and_a_bad_one_is_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let (src, m, key, data) = setup(dir.path());
    let prefix = Prefix::new("p").unwrap();
    let image = Arc::new(FileImage::open(&dir.path().join("img.raw")).unwrap());
    let pf = dir.path().join("prefetch");

    // A good copy is used, neither fetched nor staged: the object can be gone.
    store_prefetched(&pf, 8192, &data, MAX_OBJECT_LIMIT).unwrap();
    src.remove(&key);
    let r = apply(&src, &prefix, &m, image.clone(), &opts(dir.path()))
        .await
        .unwrap();
    assert_eq!(
        (r.bytes_written, r.objects_prefetched, r.bytes_fetched),
        (4096, 1, 0)
    );
    assert_eq!(
        &std::fs::read(dir.path().join("img.raw")).unwrap()[8192..12288],
        &data[..]
    );

    // Another upload of the same offset (other bytes) is not the manifest's: the
    // object is fetched.
    std::fs::remove_dir_all(&pf).unwrap();
    store_prefetched(&pf, 8192, &[9u8; 4096], MAX_OBJECT_LIMIT).unwrap();
    src.insert(&key, data.clone());
    let r = apply(&src, &prefix, &m, image.clone(), &opts(dir.path()))
        .await
        .unwrap();
    assert_eq!((r.objects_prefetched, r.bytes_fetched), (0, 4096));

    // Then the bucket's copy is verified as ever: corrupt, the apply fails.
    src.insert(&key, vec![9u8; 4096]);
    let err = apply(&src, &prefix, &m, image, &opts(dir.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, ApplyError::Checksum { .. }), "{err}");
}

#[test]
fn a_prefetched_zstd_frame_is_stored_decoded_and_anything_else_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"pilotlight ".repeat(1000);
    let sha = |b: &[u8]| Sha256Hex(Sha256::digest(b).into()).to_string();

    let frame = zstd::bulk::compress(&data, 3).unwrap();
    let p = store_prefetched(dir.path(), 0, &frame, MAX_OBJECT_LIMIT).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    assert!(p.ends_with(format!("{:020}.{}", 0, sha(&data))));

    // Not a frame, or a broken one: kept as is (the apply then fetches the object).
    let p = store_prefetched(dir.path(), 512, &data, MAX_OBJECT_LIMIT).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    let mut broken = frame.clone();
    broken.truncate(frame.len() - 1);
    let p = store_prefetched(dir.path(), 1024, &broken, MAX_OBJECT_LIMIT).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), broken);
    // Only complete files: no temp file left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    assert_eq!(names.len(), 3);
}

#[test]
fn a_prefetched_frame_larger_than_the_budgeted_size_is_kept_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"pilotlight ".repeat(1000);
    let frame = zstd::bulk::compress(&data, 3).unwrap();
    // The frame states 11 000 bytes; only 4 096 were budgeted: not decoded (so never
    // used: its name carries the frame's hash, not the data's).
    let p = store_prefetched(dir.path(), 0, &frame, 4096).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), frame);
}
