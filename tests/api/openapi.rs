//! The checked-in spec matches what the code generates, and it documents what it should.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Backend, Store, TestApp};

#[test]
fn checked_in_spec_matches_latchkey_openapi() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .arg("openapi")
        .output()
        .expect("run latchkey openapi");
    assert!(output.status.success());
    let generated = String::from_utf8(output.stdout).expect("utf-8");
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
        .expect("openapi/openapi.json");
    assert!(
        generated == checked_in,
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn spec_documents_every_operation_errors_and_the_bearer_scheme() {
    let spec: Value = serde_json::from_str(&latchkey::api::spec_json()).unwrap();
    let expected = [
        ("/v1/auth/register", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/refresh", "post"),
        ("/v1/auth/logout", "post"),
        ("/v1/auth/session", "get"),
        ("/v1/users/me", "get"),
        ("/.well-known/jwks.json", "get"),
        ("/health", "get"),
        ("/ready", "get"),
    ];
    for (path, method) in expected {
        let op = &spec["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing");
        if path.starts_with("/v1/") {
            let responses = op["responses"].as_object().unwrap();
            for status in ["400", "401", "503"] {
                assert!(responses.contains_key(status), "{method} {path} lacks {status}");
            }
            assert_eq!(
                responses["401"]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem"
            );
        }
    }
    for path in ["/v1/auth/logout", "/v1/auth/session", "/v1/users/me"] {
        let op = spec["paths"][path].as_object().unwrap().values().next().unwrap();
        assert!(
            op["security"].to_string().contains("BearerAuth"),
            "{path} is not marked as bearer-protected"
        );
    }
    assert_eq!(spec["components"]["securitySchemes"]["BearerAuth"]["scheme"], "bearer");
}

#[tokio::test]
async fn swagger_ui_and_spec_are_served() {
    let app = TestApp::spawn(Backend::Sqlite, Store::InProcess).await;
    let resp = app.get("/docs", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().to_lowercase().contains("swagger"));
    let served: Value = app.get("/openapi.json", None).await.json().await.unwrap();
    let generated: Value = serde_json::from_str(&latchkey::api::spec_json()).unwrap();
    assert_eq!(served, generated);
}
