//! TLS and SASL to the brokers: the first-class `[sink]` keys, their validation, and the librdkafka
//! settings they become.
//!
//! librdkafka is built with OpenSSL compiled from crates.io (`ssl-vendored`), which gives TLS and the
//! SASL mechanisms PLAIN, SCRAM-SHA-256/512 and OAUTHBEARER without any system library. GSSAPI
//! (Kerberos) would need cyrus-sasl and is not built in. Validation refuses combinations librdkafka
//! would only fail on at the first connection (a mechanism without a SASL protocol, a certificate
//! without TLS, a first-class key repeated in `[sink.librdkafka]`), naming the key and the fix. The
//! password is passed to librdkafka and never put in an error or a log line.

use std::path::Path;

use tailgate_pipeline::{KeyError, key_error};

use crate::KafkaConfig;

const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
const MECHANISMS: [&str; 4] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

/// Each first-class key with the librdkafka property it sets.
fn first_class(c: &KafkaConfig) -> [(&'static str, &'static str, Option<&String>); 8] {
    [
        ("security_protocol", "security.protocol", c.security_protocol.as_ref()),
        ("sasl_mechanism", "sasl.mechanisms", c.sasl_mechanism.as_ref()),
        ("sasl_username", "sasl.username", c.sasl_username.as_ref()),
        ("sasl_password", "sasl.password", c.sasl_password.as_ref()),
        ("ssl_ca_location", "ssl.ca.location", c.ssl_ca_location.as_ref()),
        ("ssl_certificate_location", "ssl.certificate.location", c.ssl_certificate_location.as_ref()),
        ("ssl_key_location", "ssl.key.location", c.ssl_key_location.as_ref()),
        ("ssl_key_password", "ssl.key.password", c.ssl_key_password.as_ref()),
    ]
}

fn protocol(c: &KafkaConfig) -> String {
    c.security_protocol
        .as_deref()
        .or(c.librdkafka.get("security.protocol").map(String::as_str))
        .unwrap_or("plaintext")
        .to_ascii_lowercase()
}

fn mechanism(c: &KafkaConfig) -> Option<String> {
    c.sasl_mechanism
        .as_deref()
        .or(c.librdkafka.get("sasl.mechanisms").or(c.librdkafka.get("sasl.mechanism")).map(String::as_str))
        .map(str::to_ascii_uppercase)
}

pub(crate) fn validate(c: &KafkaConfig) -> Result<(), KeyError> {
    for (key, property, value) in first_class(c) {
        if value.is_some() && c.librdkafka.contains_key(property) {
            return Err(key_error(
                format!("sink.{key}"),
                format!("is also set as sink.librdkafka.\"{property}\". Fix: keep one of the two"),
            ));
        }
    }
    let protocol = protocol(c);
    if !PROTOCOLS.contains(&protocol.as_str()) {
        return Err(key_error(
            "sink.security_protocol",
            format!("{protocol:?} is not one of plaintext, ssl, sasl_plaintext, sasl_ssl"),
        ));
    }
    let sasl = protocol.starts_with("sasl_");
    let tls = protocol.ends_with("ssl");
    match (mechanism(c), sasl) {
        (None, true) => {
            return Err(key_error(
                "sink.sasl_mechanism",
                format!(
                    "security_protocol = {protocol:?} needs a mechanism. Fix: set sasl_mechanism to one of {}",
                    MECHANISMS.join(", ")
                ),
            ));
        }
        (Some(m), false) => {
            return Err(key_error(
                "sink.security_protocol",
                format!(
                    "sasl_mechanism = {m:?} is set but security_protocol is {protocol:?}. Fix: set \
                     security_protocol = \"sasl_ssl\" (or \"sasl_plaintext\" on a trusted network)"
                ),
            ));
        }
        (Some(m), true) if m == "GSSAPI" => {
            return Err(key_error(
                "sink.sasl_mechanism",
                "GSSAPI (Kerberos) is not built into tailgate. Fix: use SCRAM-SHA-512, SCRAM-SHA-256 or OAUTHBEARER",
            ));
        }
        (Some(m), true) if !MECHANISMS.contains(&m.as_str()) => {
            return Err(key_error("sink.sasl_mechanism", format!("{m:?} is not one of {}", MECHANISMS.join(", "))));
        }
        (Some(m), true) if m == "OAUTHBEARER" => {
            if c.sasl_username.is_some() || c.sasl_password.is_some() {
                return Err(key_error(
                    "sink.sasl_username",
                    "OAUTHBEARER takes no username or password. Fix: remove them and set \
                     \"sasl.oauthbearer.method\" = \"oidc\", \"sasl.oauthbearer.client.id\", \
                     \"sasl.oauthbearer.client.secret\" and \"sasl.oauthbearer.token.endpoint.url\" in [sink.librdkafka]",
                ));
            }
        }
        (Some(m), true) => {
            let username = c.sasl_username.is_some() || c.librdkafka.contains_key("sasl.username");
            let password = c.sasl_password.is_some() || c.librdkafka.contains_key("sasl.password");
            for (present, key) in [(username, "sink.sasl_username"), (password, "sink.sasl_password")] {
                if !present {
                    return Err(key_error(
                        key,
                        format!(
                            "sasl_mechanism = {m:?} needs it. Fix: set it (a password from ${{file:/path}} or ${{ENV}})"
                        ),
                    ));
                }
            }
        }
        (None, false) => {}
    }
    let files = [
        ("ssl_ca_location", &c.ssl_ca_location),
        ("ssl_certificate_location", &c.ssl_certificate_location),
        ("ssl_key_location", &c.ssl_key_location),
    ];
    for (key, value) in files {
        let Some(path) = value else { continue };
        if !tls {
            return Err(key_error(
                format!("sink.{key}"),
                format!(
                    "is set but security_protocol is {protocol:?}, which does not use TLS. Fix: set \
                     security_protocol = \"ssl\" or \"sasl_ssl\""
                ),
            ));
        }
        // librdkafka's "probe" looks for the system's CA bundle itself.
        let probe = key == "ssl_ca_location" && path == "probe";
        if !probe && let Err(e) = std::fs::metadata(Path::new(path)) {
            return Err(key_error(format!("sink.{key}"), format!("cannot read {path}: {e}. Fix: correct the path")));
        }
    }
    if c.ssl_certificate_location.is_some() != c.ssl_key_location.is_some() {
        return Err(key_error(
            "sink.ssl_key_location",
            "a client certificate needs its key and the other way round. Fix: set both ssl_certificate_location \
             and ssl_key_location",
        ));
    }
    Ok(())
}

/// The librdkafka properties of the first-class keys (values as written; the protocol lowercased).
pub(crate) fn librdkafka_settings(c: &KafkaConfig) -> Vec<(&'static str, String)> {
    first_class(c)
        .into_iter()
        .filter_map(|(key, property, value)| {
            let value = value?;
            Some((
                property,
                match key {
                    "security_protocol" => value.to_ascii_lowercase(),
                    "sasl_mechanism" => value.to_ascii_uppercase(),
                    _ => value.clone(),
                },
            ))
        })
        .collect()
}

/// How the sink connects, for `tailgate check` and the start-up log: never a secret.
pub(crate) fn describe(c: &KafkaConfig) -> String {
    let protocol = protocol(c);
    let client_cert = if c.ssl_certificate_location.is_some() { " with a client certificate" } else { "" };
    match (protocol.as_str(), mechanism(c)) {
        ("ssl", _) => format!("TLS{client_cert}"),
        ("sasl_ssl", Some(m)) => format!("SASL {m} over TLS{client_cert}"),
        ("sasl_plaintext", Some(m)) => format!("SASL {m} without TLS"),
        _ => "plaintext".to_owned(),
    }
}

/// The fix for a connection failure, from what librdkafka reported.
pub(crate) fn fix_for(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("security.protocol") {
        // librdkafka's hint when a plaintext client meets a TLS listener, or the other way round.
        "set sink.security_protocol to what the listener speaks (\"ssl\" or \"sasl_ssl\" for a TLS listener)"
    } else if e.contains("certificate required") {
        "set sink.ssl_certificate_location and sink.ssl_key_location: the brokers require a client certificate"
    } else if e.contains("sasl") || e.contains("authenticat") {
        "check sink.sasl_mechanism, sink.sasl_username and sink.sasl_password: the broker refused them"
    } else if e.contains("ssl") || e.contains("certificate") || e.contains("handshake") {
        "check sink.ssl_ca_location (the CA that signed the brokers' certificates), that sink.brokers names a \
         host in the certificate, and sink.ssl_certificate_location / sink.ssl_key_location if the brokers \
         require a client certificate"
    } else {
        "start the broker or correct sink.brokers (and sink.security_protocol: a TLS listener does not answer \
         plaintext)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> KafkaConfig {
        toml::from_str(&format!("brokers = \"b:9093\"\n{extra}")).unwrap()
    }

    fn error(extra: &str) -> String {
        let e = validate(&config(extra)).unwrap_err();
        e.to_string()
    }

    #[test]
    fn plaintext_by_default_and_nothing_set() {
        let c = config("");
        assert!(validate(&c).is_ok());
        assert!(librdkafka_settings(&c).is_empty());
        assert_eq!(describe(&c), "plaintext");
    }

    #[test]
    fn sasl_scram_over_tls_becomes_librdkafka_settings() {
        let c = config(
            "security_protocol = \"SASL_SSL\"\nsasl_mechanism = \"scram-sha-512\"\nsasl_username = \"u\"\nsasl_password = \"p\"",
        );
        assert!(validate(&c).is_ok());
        let settings = librdkafka_settings(&c);
        assert!(settings.contains(&("security.protocol", "sasl_ssl".to_owned())));
        assert!(settings.contains(&("sasl.mechanisms", "SCRAM-SHA-512".to_owned())));
        assert!(settings.contains(&("sasl.password", "p".to_owned())));
        assert_eq!(describe(&c), "SASL SCRAM-SHA-512 over TLS");
    }

    #[test]
    fn inconsistent_settings_name_the_key_and_the_fix() {
        let e = error("security_protocol = \"tls\"");
        assert!(e.contains("sink.security_protocol") && e.contains("sasl_ssl"), "{e}");
        let e = error("security_protocol = \"sasl_ssl\"");
        assert!(e.contains("sink.sasl_mechanism") && e.contains("SCRAM-SHA-512"), "{e}");
        let e = error("sasl_mechanism = \"PLAIN\"");
        assert!(e.contains("sink.security_protocol") && e.contains("sasl_ssl"), "{e}");
        let e = error("security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"");
        assert!(e.contains("sink.sasl_password"), "{e}");
        let e = error("security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"GSSAPI\"");
        assert!(e.contains("Kerberos"), "{e}");
        let e = error("security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"\nsasl_username = \"u\"");
        assert!(e.contains("sasl.oauthbearer.method"), "{e}");
        let e = error("ssl_ca_location = \"/etc/hostname\"");
        assert!(e.contains("sink.ssl_ca_location") && e.contains("\"ssl\""), "{e}");
        let e = error("security_protocol = \"ssl\"\nssl_ca_location = \"/nonexistent/ca.pem\"");
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let e = error("security_protocol = \"ssl\"\nssl_certificate_location = \"/etc/hostname\"");
        assert!(e.contains("sink.ssl_key_location"), "{e}");
        let e = error("security_protocol = \"ssl\"\n[librdkafka]\n\"security.protocol\" = \"ssl\"");
        assert!(e.contains("sink.security_protocol") && e.contains("keep one"), "{e}");
    }

    #[test]
    fn oauthbearer_needs_no_password_and_ca_probe_is_accepted() {
        let c =
            config("security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"OAUTHBEARER\"\nssl_ca_location = \"probe\"");
        assert!(validate(&c).is_ok());
        assert_eq!(describe(&c), "SASL OAUTHBEARER over TLS");
    }

    #[test]
    fn fixes_follow_the_reported_failure() {
        assert!(fix_for("SASL authentication error: Authentication failed").contains("sasl_password"));
        assert!(fix_for("SSL handshake failed: certificate verify failed").contains("ssl_ca_location"));
        assert!(fix_for("Local: Broker transport failure").contains("sink.brokers"));
        assert!(fix_for("tlsv13 alert certificate required").contains("ssl_certificate_location"));
        let plaintext_to_tls = "Disconnected while requesting ApiVersion: might be caused by incorrect \
                                security.protocol configuration (connecting to a SSL listener?)";
        assert!(fix_for(plaintext_to_tls).contains("sink.security_protocol"));
    }
}
