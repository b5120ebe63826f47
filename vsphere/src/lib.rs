//! A vSphere Web Services (SOAP) client with just the calls pilotlight needs: login,
//! find a VM, read its disks and CBT state, enable CBT, snapshots, changeIds,
//! `QueryChangedDiskAreas` (paged), task polling, keepalive, and re-login when the
//! session expired (`NotAuthenticated`).

pub mod xml;

use sha2::Digest;
use std::collections::HashMap;
use std::time::Duration;
use xml::{esc, Node};

/// A managed object reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }
    fn from_node(n: &Node) -> Option<Self> {
        Some(Self::new(n.attr("type")?, n.text.trim()))
    }
    /// As an element named `name`.
    pub fn xml(&self, name: &str) -> String {
        format!(
            r#"<{name} type="{}">{}</{name}>"#,
            esc(&self.kind),
            esc(&self.value)
        )
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VsError {
    #[error("{url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url}: HTTP {status} for {method}: {body}")]
    Status {
        url: String,
        method: String,
        status: u16,
        body: String,
    },
    #[error("{method}: {0}", method = .1)]
    Xml(xml::XmlError, String),
    #[error("{method} failed: {fault}: {message}")]
    Fault {
        method: String,
        fault: String,
        message: String,
    },
    #[error("thumbprint {0:?} is not a certificate thumbprint: give 40 (SHA-1) or 64 (SHA-256) hex digits, e.g. from `openssl x509 -fingerprint -sha256`")]
    BadThumbprint(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("task {what} failed: {fault}: {message}")]
    Task {
        what: String,
        fault: String,
        message: String,
    },
    #[error("task {what} did not finish within {secs} s")]
    TaskTimeout { what: String, secs: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("unexpected answer to {method}: {what}")]
    Shape { method: String, what: String },
}

impl VsError {
    /// The vSphere fault type (`NotAuthenticated`, `InvalidArgument`, `FileFault`, ...).
    pub fn fault(&self) -> Option<&str> {
        match self {
            VsError::Fault { fault, .. } | VsError::Task { fault, .. } => Some(fault),
            _ => None,
        }
    }
}

/// How to reach vCenter or ESXi.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `https://vcenter.example.com/sdk` (or `http://` for the simulator).
    pub url: String,
    pub user: String,
    pub password: String,
    /// Expected SHA-256 (or SHA-1) thumbprint of the server certificate, `AA:BB:...`:
    /// self-signed certificates are then accepted only with this fingerprint.
    pub thumbprint: Option<String>,
    /// Accept any certificate (labs only).
    pub insecure: bool,
    pub timeout: Duration,
}

/// What `RetrieveServiceContent` names.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub view_manager: MoRef,
    pub session_manager: MoRef,
    pub api_version: String,
}

/// A logged-in session. Calls that meet `NotAuthenticated` log in again and retry once.
#[derive(Debug)]
pub struct Session {
    http: reqwest::Client,
    opts: ConnectOptions,
    pub content: ServiceContent,
    logins: std::sync::atomic::AtomicU32,
    /// The session cookie (`vmware_soap_session`), kept by hand so a re-login can start
    /// a fresh session.
    cookie: std::sync::Mutex<Option<String>>,
}

fn normalize_thumbprint(t: &str) -> String {
    t.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The server certificate check with `--thumbprint`: in the TLS handshake, the server's
/// certificate must be exactly the pinned one (its SHA-256, or SHA-1 as vCenter shows
/// it); anything else fails the handshake, so no request byte (the login's password)
/// reaches a server that is not it. The handshake's signatures are still verified, so
/// the server must hold the pinned certificate's key.
#[derive(Debug)]
struct PinnedCertificate {
    /// Lower-case hex, 40 or 64 digits.
    want: String,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let got = if self.want.len() == 40 {
            hex::encode(sha1::Sha1::digest(end_entity.as_ref()))
        } else {
            hex::encode(sha2::Sha256::digest(end_entity.as_ref()))
        };
        if got == self.want {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has thumbprint {got}, not the pinned {}",
                self.want
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS configuration that trusts exactly the certificate with this thumbprint.
fn pinned_tls(thumbprint: &str) -> Result<rustls::ClientConfig, VsError> {
    let want = normalize_thumbprint(thumbprint);
    if want.len() != 40 && want.len() != 64 {
        return Err(VsError::BadThumbprint(thumbprint.into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCertificate {
        want,
        provider: provider.clone(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VsError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth())
}

const ENVELOPE_HEAD: &str = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>"#;
const ENVELOPE_TAIL: &str = "</soapenv:Body></soapenv:Envelope>";

impl Session {
    /// Connects, reads the service content and logs in.
    pub async fn connect(opts: ConnectOptions) -> Result<Self, VsError> {
        let mut builder = reqwest::Client::builder().timeout(opts.timeout);
        // Pinned: checked in the handshake (PinnedCertificate). Neither: the platform's
        // WebPKI checks. Insecure: nothing checked, said out loud.
        if let Some(t) = &opts.thumbprint {
            builder = builder.use_preconfigured_tls(pinned_tls(t)?);
        } else if opts.insecure {
            tracing::warn!(
                url = %opts.url,
                "--insecure: the server's certificate is not checked; anyone on the path can read the vCenter password (pin it with --thumbprint instead)"
            );
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder.build().map_err(|source| VsError::Http {
            url: opts.url.clone(),
            source,
        })?;
        let mut s = Self {
            http,
            opts,
            content: ServiceContent {
                root_folder: MoRef::new("Folder", ""),
                property_collector: MoRef::new("PropertyCollector", ""),
                view_manager: MoRef::new("ViewManager", ""),
                session_manager: MoRef::new("SessionManager", ""),
                api_version: String::new(),
            },
            logins: 0.into(),
            cookie: std::sync::Mutex::new(None),
        };
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        let r = s.post("RetrieveServiceContent", &si, "").await?;
        let rv = r
            .child("returnval")
            .ok_or_else(|| shape("RetrieveServiceContent", "no returnval"))?;
        let mo = |name: &str| {
            rv.child(name)
                .and_then(MoRef::from_node)
                .ok_or_else(|| shape("RetrieveServiceContent", &format!("no {name}")))
        };
        s.content = ServiceContent {
            root_folder: mo("rootFolder")?,
            property_collector: mo("propertyCollector")?,
            view_manager: mo("viewManager")?,
            session_manager: mo("sessionManager")?,
            api_version: rv.text_at("about/apiVersion").unwrap_or("").to_string(),
        };
        s.login().await?;
        Ok(s)
    }

    /// How many times this session logged in (1 + re-logins).
    pub fn logins(&self) -> u32 {
        self.logins.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn login(&self) -> Result<(), VsError> {
        // A new session, not the expired one.
        *self.cookie.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let body = format!(
            "<userName>{}</userName><password>{}</password>",
            esc(&self.opts.user),
            esc(&self.opts.password)
        );
        self.post("Login", &self.content.session_manager, &body)
            .await?;
        self.logins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Ends the session (best effort).
    pub async fn logout(&self) {
        let _ = self.post("Logout", &self.content.session_manager, "").await;
    }

    /// Keeps the session alive (a cheap call; re-logs in if it had expired).
    pub async fn keepalive(&self) -> Result<(), VsError> {
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        self.call("CurrentTime", &si, "").await.map(|_| ())
    }

    /// Calls `method` on `this`; the `<methodResponse>` element. A `NotAuthenticated`
    /// fault (the session expired) logs in again and retries once.
    pub async fn call(&self, method: &str, this: &MoRef, args: &str) -> Result<Node, VsError> {
        match self.post(method, this, args).await {
            Err(e) if e.fault() == Some("NotAuthenticated") => {
                tracing::warn!(method, "vSphere session expired: logging in again");
                self.login().await?;
                self.post(method, this, args).await
            }
            other => other,
        }
    }

    async fn post(&self, method: &str, this: &MoRef, args: &str) -> Result<Node, VsError> {
        let body = format!(
            r#"{ENVELOPE_HEAD}<{method} xmlns="urn:vim25">{}{args}</{method}>{ENVELOPE_TAIL}"#,
            this.xml("_this")
        );
        let url = &self.opts.url;
        let mut req = self
            .http
            .post(url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", "urn:vim25/6.7")
            .body(body);
        let cookie = self
            .cookie
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(c) = cookie {
            req = req.header("Cookie", c);
        }
        let resp = req.send().await.map_err(|source| VsError::Http {
            url: url.clone(),
            source,
        })?;
        for v in resp.headers().get_all("set-cookie") {
            if let Some(pair) = v.to_str().ok().and_then(|v| v.split(';').next()) {
                if pair.trim_start().starts_with("vmware_soap_session=") {
                    *self.cookie.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(pair.trim().to_string());
                }
            }
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|source| VsError::Http {
            url: url.clone(),
            source,
        })?;
        let doc = match Node::parse(&text) {
            Ok(d) => d,
            Err(_) if status >= 400 => {
                return Err(VsError::Status {
                    url: url.clone(),
                    method: method.into(),
                    status,
                    body: text.chars().take(200).collect(),
                })
            }
            Err(e) => return Err(VsError::Xml(e, method.into())),
        };
        let body = doc
            .child("Body")
            .ok_or_else(|| shape(method, "no SOAP Body"))?;
        if let Some(f) = body.child("Fault") {
            let detail = f.child("detail").and_then(|d| d.children.first());
            let fault = detail
                .map(|d| {
                    d.xsi_type()
                        .map(str::to_string)
                        .unwrap_or_else(|| d.name.trim_end_matches("Fault").to_string())
                })
                .unwrap_or_else(|| "SoapFault".into());
            return Err(VsError::Fault {
                method: method.into(),
                fault,
                message: f.text_at("faultstring").unwrap_or("").to_string(),
            });
        }
        body.children
            .first()
            .cloned()
            .ok_or_else(|| shape(method, "empty SOAP Body"))
    }

    /// The properties `paths` of `obj`: path -> the `val` element.
    pub async fn properties(
        &self,
        obj: &MoRef,
        paths: &[&str],
    ) -> Result<HashMap<String, Node>, VsError> {
        let path_xml: String = paths
            .iter()
            .map(|p| format!("<pathSet>{}</pathSet>", esc(p)))
            .collect();
        let args = format!(
            "<specSet><propSet><type>{}</type>{path_xml}</propSet><objectSet>{}</objectSet></specSet><options/>",
            esc(&obj.kind),
            obj.xml("obj")
        );
        let r = self
            .call(
                "RetrievePropertiesEx",
                &self.content.property_collector,
                &args,
            )
            .await?;
        let mut out = HashMap::new();
        if let Some(o) = r.at("returnval/objects") {
            for p in o.children("propSet") {
                if let (Some(name), Some(val)) = (p.text_at("name"), p.child("val")) {
                    out.insert(name.to_string(), val.clone());
                }
            }
        }
        Ok(out)
    }

    /// Every VM's (name, moref), through a container view of the inventory.
    pub async fn vms(&self) -> Result<Vec<(String, MoRef)>, VsError> {
        let args = format!(
            "{}<type>VirtualMachine</type><recursive>true</recursive>",
            self.content.root_folder.xml("container")
        );
        let view = self
            .call("CreateContainerView", &self.content.view_manager, &args)
            .await?;
        let view = view
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| shape("CreateContainerView", "no view"))?;
        let args = format!(
            r#"<specSet><propSet><type>VirtualMachine</type><pathSet>name</pathSet></propSet><objectSet>{}<skip>true</skip><selectSet xsi:type="TraversalSpec"><name>view</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet></objectSet></specSet><options/>"#,
            view.xml("obj")
        );
        let mut out = Vec::new();
        let mut r = self
            .call(
                "RetrievePropertiesEx",
                &self.content.property_collector,
                &args,
            )
            .await?;
        loop {
            for o in r
                .at("returnval")
                .map(|x| x.children("objects").collect::<Vec<_>>())
                .unwrap_or_default()
            {
                let (Some(mo), Some(name)) = (
                    o.child("obj").and_then(MoRef::from_node),
                    o.child("propSet").and_then(|p| p.text_at("val")),
                ) else {
                    continue;
                };
                out.push((name.to_string(), mo));
            }
            let Some(token) = r.text_at("returnval/token").map(str::to_string) else {
                break;
            };
            r = self
                .call(
                    "ContinueRetrievePropertiesEx",
                    &self.content.property_collector,
                    &format!("<token>{}</token>", esc(&token)),
                )
                .await?;
        }
        let _ = self.call("DestroyView", &view, "").await;
        Ok(out)
    }

    /// The VM named `name` (or with MoRef id `name`, e.g. `vm-42`).
    pub async fn find_vm(&self, name: &str) -> Result<MoRef, VsError> {
        let vms = self.vms().await?;
        vms.iter()
            .find(|(n, m)| n == name || m.value == name)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| {
                VsError::NotFound(format!(
                    "no VM named {name:?} (or with MoRef {name:?}) among {} VMs",
                    vms.len()
                ))
            })
    }

    /// Waits for a task (polling `info`, with a deadline); its `info/result`.
    pub async fn wait_task(
        &self,
        task: &MoRef,
        what: &str,
        deadline: Duration,
    ) -> Result<Option<Node>, VsError> {
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let p = self.properties(task, &["info"]).await?;
            let info = p
                .get("info")
                .ok_or_else(|| shape("RetrievePropertiesEx", "task without info"))?;
            match info.text_at("state") {
                Some("success") => return Ok(info.child("result").cloned()),
                Some("error") => {
                    let err = info.child("error");
                    return Err(VsError::Task {
                        what: what.into(),
                        fault: err
                            .and_then(|e| e.child("fault"))
                            .and_then(|f| f.xsi_type())
                            .unwrap_or("Fault")
                            .to_string(),
                        message: err
                            .and_then(|e| e.text_at("localizedMessage"))
                            .unwrap_or("")
                            .to_string(),
                    });
                }
                _ => {}
            }
            if started.elapsed() > deadline {
                return Err(VsError::TaskTimeout {
                    what: what.into(),
                    secs: deadline.as_secs(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Starts a `*_Task` method and waits for it.
    pub async fn run_task(
        &self,
        method: &str,
        this: &MoRef,
        args: &str,
        deadline: Duration,
    ) -> Result<Option<Node>, VsError> {
        let r = self.call(method, this, args).await?;
        let task = r
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| shape(method, "no task"))?;
        self.wait_task(&task, &format!("{method} on {this}"), deadline)
            .await
    }
}

fn shape(method: &str, what: &str) -> VsError {
    VsError::Shape {
        method: method.into(),
        what: what.into(),
    }
}

// ---- what pilotlight reads and does ------------------------------------------------------

/// A virtual disk of a VM (or of a snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub key: i32,
    pub label: String,
    pub file_name: String,
    pub capacity: u64,
    pub disk_mode: String,
    /// The CBT change id of this disk's current state (from a snapshot: at the snapshot).
    pub change_id: Option<String>,
    /// Why it cannot be replicated, if it cannot (independent, physical RDM).
    pub skip: Option<String>,
}

/// A snapshot in the VM's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub snapshot: MoRef,
    pub name: String,
    pub description: String,
}

/// The VM's state that matters here.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub name: String,
    pub cbt_enabled: bool,
    pub disks: Vec<Disk>,
    /// Methods vCenter disabled on the VM (e.g. `RelocateVM_Task` left by a backup that
    /// never called EndAccess).
    pub disabled_methods: Vec<String>,
    pub snapshots: Vec<SnapshotInfo>,
}

/// The disks in a `config.hardware.device` value.
pub fn parse_disks(devices: &Node) -> Vec<Disk> {
    let mut out = Vec::new();
    for d in &devices.children {
        if d.xsi_type() != Some("VirtualDisk") {
            continue;
        }
        let Some(backing) = d.child("backing") else {
            continue;
        };
        let key: i32 = d.text_at("key").and_then(|k| k.parse().ok()).unwrap_or(-1);
        let capacity = d
            .text_at("capacityInBytes")
            .and_then(|c| c.parse().ok())
            .or_else(|| {
                d.text_at("capacityInKB")
                    .and_then(|c| c.parse::<u64>().ok())
                    .map(|k| k * 1024)
            })
            .unwrap_or(0);
        let disk_mode = backing
            .text_at("diskMode")
            .unwrap_or("persistent")
            .to_string();
        let rdm = backing.xsi_type() == Some("VirtualDiskRawDiskMappingVer1BackingInfo");
        let skip = if disk_mode.starts_with("independent") {
            Some(format!(
                "disk mode {disk_mode}: independent disks are not in snapshots; change it to dependent to protect this disk"
            ))
        } else if rdm && backing.text_at("compatibilityMode") == Some("physicalMode") {
            Some("physical-mode RDM: it cannot be snapshotted; protect the LUN another way, or switch it to virtual mode".into())
        } else {
            None
        };
        out.push(Disk {
            key,
            label: d.text_at("deviceInfo/label").unwrap_or("").to_string(),
            file_name: backing.text_at("fileName").unwrap_or("").to_string(),
            capacity,
            disk_mode,
            change_id: backing.text_at("changeId").map(str::to_string),
            skip,
        });
    }
    out
}

fn parse_snapshots(list: &Node, out: &mut Vec<SnapshotInfo>) {
    for t in &list.children {
        if let Some(s) = t.child("snapshot").and_then(MoRef::from_node) {
            out.push(SnapshotInfo {
                snapshot: s,
                name: t.text_at("name").unwrap_or("").into(),
                description: t.text_at("description").unwrap_or("").into(),
            });
        }
        for c in t.children("childSnapshotList") {
            let wrapper = Node {
                children: vec![c.clone()],
                ..Default::default()
            };
            parse_snapshots(&wrapper, out);
        }
    }
}

impl Session {
    pub async fn vm_info(&self, vm: &MoRef) -> Result<VmInfo, VsError> {
        let p = self
            .properties(
                vm,
                &[
                    "name",
                    "config.changeTrackingEnabled",
                    "config.hardware.device",
                    "disabledMethod",
                    "snapshot",
                ],
            )
            .await?;
        let mut snapshots = Vec::new();
        if let Some(s) = p.get("snapshot") {
            let roots = Node {
                children: s.children("rootSnapshotList").cloned().collect(),
                ..Default::default()
            };
            parse_snapshots(&roots, &mut snapshots);
        }
        Ok(VmInfo {
            name: p
                .get("name")
                .map(|n| n.text.trim().to_string())
                .unwrap_or_default(),
            cbt_enabled: p
                .get("config.changeTrackingEnabled")
                .is_some_and(|n| n.text.trim() == "true"),
            disks: p
                .get("config.hardware.device")
                .map(parse_disks)
                .unwrap_or_default(),
            disabled_methods: p
                .get("disabledMethod")
                .map(|n| {
                    n.children
                        .iter()
                        .map(|c| c.text.trim().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            snapshots,
        })
    }

    /// Turns changed-block tracking on (takes effect at the next snapshot).
    pub async fn enable_cbt(&self, vm: &MoRef) -> Result<(), VsError> {
        self.run_task(
            "ReconfigVM_Task",
            vm,
            "<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>",
            Duration::from_secs(600),
        )
        .await
        .map(|_| ())
    }

    pub async fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<MoRef, VsError> {
        let args = format!(
            "<name>{}</name><description>{}</description><memory>false</memory><quiesce>{quiesce}</quiesce>",
            esc(name),
            esc(description)
        );
        let r = self
            .run_task("CreateSnapshot_Task", vm, &args, Duration::from_secs(3600))
            .await?;
        r.as_ref()
            .and_then(MoRef::from_node)
            .ok_or_else(|| shape("CreateSnapshot_Task", "no snapshot in the task result"))
    }

    pub async fn remove_snapshot(&self, snapshot: &MoRef) -> Result<(), VsError> {
        self.run_task(
            "RemoveSnapshot_Task",
            snapshot,
            "<removeChildren>false</removeChildren><consolidate>true</consolidate>",
            Duration::from_secs(3600),
        )
        .await
        .map(|_| ())
    }

    /// The disks as the snapshot holds them (their change ids are the snapshot's).
    pub async fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<Disk>, VsError> {
        let p = self
            .properties(snapshot, &["config.hardware.device"])
            .await?;
        Ok(p.get("config.hardware.device")
            .map(parse_disks)
            .unwrap_or_default())
    }

    /// `QueryChangedDiskAreas` from `change_id` (`*`: every allocated area) up to the
    /// snapshot, paged by `startOffset` until the disk is covered. Sorted byte ranges.
    pub async fn changed_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        disk: &Disk,
        change_id: &str,
    ) -> Result<Vec<(u64, u64)>, VsError> {
        let mut out = Vec::new();
        let mut start = 0u64;
        while start < disk.capacity {
            let args = format!(
                "{}<deviceKey>{}</deviceKey><startOffset>{start}</startOffset><changeId>{}</changeId>",
                snapshot.xml("snapshot"),
                disk.key,
                esc(change_id)
            );
            let r = self.call("QueryChangedDiskAreas", vm, &args).await?;
            let rv = r
                .child("returnval")
                .ok_or_else(|| shape("QueryChangedDiskAreas", "no returnval"))?;
            let num = |n: &Node, p: &str| -> Result<u64, VsError> {
                n.text_at(p)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| shape("QueryChangedDiskAreas", &format!("no {p}")))
            };
            let page_start = num(rv, "startOffset")?;
            let page_len = num(rv, "length")?;
            if page_start != start {
                return Err(shape(
                    "QueryChangedDiskAreas",
                    &format!("page starts at {page_start}, asked for {start}"),
                ));
            }
            for a in rv.children("changedArea") {
                let (s, l) = (num(a, "start")?, num(a, "length")?);
                if s < page_start || s.saturating_add(l) > disk.capacity {
                    return Err(shape(
                        "QueryChangedDiskAreas",
                        &format!("area {s}+{l} outside its page"),
                    ));
                }
                out.push((s, l));
            }
            if page_len == 0 {
                break; // nothing more is known past here
            }
            start = page_start + page_len;
        }
        out.sort_unstable();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `config.hardware.device` value as vCenter returns it (shape from the vSphere
    /// API reference): a normal disk, an independent one, a physical RDM, a CD-ROM.
    const DEVICES: &str = r#"<val xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="ArrayOfVirtualDevice">
      <VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo>
        <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web-01/web-01.vmdk</fileName><diskMode>persistent</diskMode><changeId>52 3c 1d/4</changeId></backing>
        <capacityInKB>41943040</capacityInKB><capacityInBytes>42949672960</capacityInBytes></VirtualDevice>
      <VirtualDevice xsi:type="VirtualDisk"><key>2001</key><deviceInfo><label>Hard disk 2</label></deviceInfo>
        <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web-01/scratch.vmdk</fileName><diskMode>independent_persistent</diskMode></backing>
        <capacityInKB>1024</capacityInKB></VirtualDevice>
      <VirtualDevice xsi:type="VirtualDisk"><key>2002</key><deviceInfo><label>Hard disk 3</label></deviceInfo>
        <backing xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[ds1] web-01/lun.vmdk</fileName><compatibilityMode>physicalMode</compatibilityMode><diskMode>persistent</diskMode></backing>
        <capacityInBytes>1073741824</capacityInBytes></VirtualDevice>
      <VirtualDevice xsi:type="VirtualCdrom"><key>3002</key></VirtualDevice>
    </val>"#;

    #[test]
    fn disks_and_what_cannot_be_protected() {
        let disks = parse_disks(&Node::parse(DEVICES).unwrap());
        assert_eq!(disks.len(), 3);
        assert_eq!(disks[0].key, 2000);
        assert_eq!(disks[0].capacity, 40 << 30);
        assert_eq!(disks[0].file_name, "[ds1] web-01/web-01.vmdk");
        assert_eq!(disks[0].change_id.as_deref(), Some("52 3c 1d/4"));
        assert!(disks[0].skip.is_none());
        assert_eq!(disks[1].capacity, 1 << 20, "from capacityInKB");
        assert!(disks[1].skip.as_deref().unwrap().contains("independent"));
        assert!(
            disks[2].skip.as_deref().unwrap().contains("independent")
                || disks[2].skip.as_deref().unwrap().contains("physical")
        );
    }

    #[test]
    fn snapshot_trees_flatten() {
        let v = Node::parse(r#"<val><rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-1</snapshot><name>a</name><description>x</description>
            <childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-2</snapshot><name>pilotlight-1</name><description>created by pilotlight</description></childSnapshotList>
            </rootSnapshotList></val>"#).unwrap();
        let roots = Node {
            children: v.children("rootSnapshotList").cloned().collect(),
            ..Default::default()
        };
        let mut out = Vec::new();
        parse_snapshots(&roots, &mut out);
        let names: Vec<_> = out.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "pilotlight-1"]);
        assert_eq!(
            out[1].snapshot,
            MoRef::new("VirtualMachineSnapshot", "snapshot-2")
        );
    }
}
