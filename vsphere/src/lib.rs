//! A vSphere Web Services (SOAP) client with just the calls pilotlight needs: login,
//! find a VM, read its disks and CBT state, enable CBT, snapshots, changeIds,
//! `QueryChangedDiskAreas` (paged), task polling, keepalive, and re-login when the
//! session expired (`NotAuthenticated`).

mod tls;
mod vm;
pub mod xml;

use tls::pinned_tls;
pub use vm::{parse_disks, Disk, SnapshotInfo, VmInfo};

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

#[cfg(test)]
mod tests;
