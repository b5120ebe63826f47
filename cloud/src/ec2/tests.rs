use super::*;
use futures::executor::block_on;

fn launch(token: &str, kind: &str) -> LaunchRequest {
    LaunchRequest {
        image_id: "ami-1".into(),
        instance_type: kind.into(),
        subnet_id: None,
        security_group_ids: vec![],
        private_ip: None,
        tags: vec![],
        client_token: token.into(),
        launch_template: None,
        imds_v2: false,
        instance_profile: None,
    }
}

fn import_request(disks: &[&str]) -> ImportRequest {
    ImportRequest {
        disks: disks
            .iter()
            .map(|k| ("b".to_string(), k.to_string()))
            .collect(),
        role_name: "vmimport".into(),
        boot_mode: None,
        license_type: None,
        description: String::new(),
        tags: vec![],
        encrypted: true,
        kms_key_id: None,
        client_token: "run-1-import".into(),
    }
}

#[test]
fn an_import_request_is_checked_as_ec2_does() {
    let ok = ImportRequest {
        kms_key_id: Some("arn:aws:kms:us-east-1:1:key/k".into()),
        ..import_request(&["k"])
    };
    ok.check().unwrap();
    let no_flag = ImportRequest {
        encrypted: false,
        ..ok.clone()
    };
    assert!(no_flag
        .check()
        .unwrap_err()
        .to_string()
        .contains("Encrypted"));
    let long = ImportRequest {
        client_token: "x".repeat(65),
        ..ok
    };
    assert!(long.check().is_err());
}

#[test]
fn an_import_walks_the_documented_states_and_makes_an_image() {
    let ec2 = MemoryEc2::default();
    let req = import_request(&["d0", "d1"]);
    block_on(async {
        let id = ec2.import_image(&req).await.unwrap();
        assert_eq!(
            ec2.import_image(&req).await.unwrap(),
            id,
            "same token, same task"
        );
        let mut seen = vec![];
        let done = loop {
            let t = ec2.describe_import_image_task(&id).await.unwrap();
            if t.status != "active" {
                break t;
            }
            seen.push(t.status_message.unwrap());
        };
        assert_eq!(seen, ["pending", "converting", "updating", "preparing ami"]);
        assert_eq!(done.status, "completed");
        assert_eq!(done.snapshot_ids.len(), 2);
        assert!(ec2.snapshot().images.contains_key(&done.image_id.unwrap()));
        // Told to fail: deleted, with the message.
        lock(&ec2.state).fail_imports = Some("ClientError: Unknown OS".into());
        let other = ImportRequest {
            client_token: "run-2-import".into(),
            ..req
        };
        let id = ec2.import_image(&other).await.unwrap();
        let mut last = ImportTask::default();
        for _ in 0..=IMPORT_FAILS_AFTER {
            last = ec2.describe_import_image_task(&id).await.unwrap();
        }
        assert_eq!(last.status, "deleted");
        assert_eq!(
            last.status_message.as_deref(),
            Some("ClientError: Unknown OS")
        );
        assert!(ec2
            .describe_import_image_task("import-ami-nope")
            .await
            .unwrap_err()
            .is_not_found());
    });
}

#[test]
fn a_repeated_launch_with_its_token_starts_no_second_instance() {
    let ec2 = MemoryEc2::default();
    block_on(async {
        let a = ec2
            .run_instance(&launch("run-1-launch", "t3.micro"))
            .await
            .unwrap();
        let b = ec2
            .run_instance(&launch("run-1-launch", "t3.micro"))
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(ec2.snapshot().instances.len(), 1);
        let e = ec2
            .run_instance(&launch("run-1-launch", "m5.large"))
            .await
            .unwrap_err();
        assert_eq!(e.code.as_deref(), Some("IdempotentParameterMismatch"));
        assert!(ec2.run_instance(&launch("", "t3.micro")).await.is_err());
        let c = ec2
            .run_instance(&launch("run-2-launch", "t3.micro"))
            .await
            .unwrap();
        assert_ne!(a, c);
    });
}
