//! Certificate pinning: the server's certificate must be exactly the one whose
//! thumbprint was given, checked in the TLS handshake.

use super::*;

pub(crate) fn normalize_thumbprint(t: &str) -> String {
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
pub(crate) struct PinnedCertificate {
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
pub(crate) fn pinned_tls(thumbprint: &str) -> Result<rustls::ClientConfig, VsError> {
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
