//! What any gRPC tool sees of a coordinator without our generated code: the
//! standard health service answers SERVING, and server reflection lists the
//! three Stagecoach services and serves their descriptors (so `grpcurl` works
//! without .proto files).
//!
//! On SQLite only: neither service reads the store.

use stagecoach_tests::{Backend, Client, Coordinator};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};

const SERVICES: [&str; 3] = [
    "stagecoach.v1.MigrationService",
    "stagecoach.v1.WorkerService",
    "stagecoach.v1.AdminService",
];

#[tokio::test(flavor = "multi_thread")]
async fn health_check_answers_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator =
        Coordinator::start(Backend::Sqlite, &dir.path().join("coordinator"), &[]).await;
    let client = Client::connect(&coordinator.url()).await;

    let resp = HealthClient::new(client.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("grpc.health.v1.Health/Check")
        .into_inner();
    assert_eq!(resp.status(), ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_and_describes_the_stagecoach_services() {
    let dir = tempfile::tempdir().expect("temp dir");
    let coordinator =
        Coordinator::start(Backend::Sqlite, &dir.path().join("coordinator"), &[]).await;
    let client = Client::connect(&coordinator.url()).await;

    let services = list_services(client.channel.clone()).await;
    for s in SERVICES {
        assert!(services.iter().any(|n| n == s), "{s} not in {services:?}");
    }

    let files = file_containing_symbol(client.channel.clone(), SERVICES[0]).await;
    assert!(!files.is_empty(), "no descriptor for {}", SERVICES[0]);
}

/// `ListServices` over grpc.reflection.v1, or v1alpha if the server only
/// speaks that.
async fn list_services(channel: Channel) -> Vec<String> {
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    match client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
    {
        Ok(resp) => {
            let first = resp.into_inner().next().await;
            match first.map(|r| r.map(|r| r.message_response)) {
                Some(Ok(Some(MessageResponse::ListServicesResponse(list)))) => {
                    list.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }
        Err(s) if s.code() == Code::Unimplemented => list_services_v1alpha(channel).await,
        Err(s) => panic!("grpc.reflection.v1 ListServices: {s}"),
    }
}

async fn list_services_v1alpha(channel: Channel) -> Vec<String> {
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let resp = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("grpc.reflection.v1alpha ListServices");
    match resp
        .into_inner()
        .next()
        .await
        .map(|r| r.map(|r| r.message_response))
    {
        Some(Ok(Some(MessageResponse::ListServicesResponse(list)))) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// The encoded file descriptors reflection returns for `symbol`
/// (grpc.reflection.v1, falling back to v1alpha).
async fn file_containing_symbol(channel: Channel, symbol: &str) -> Vec<Vec<u8>> {
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    match client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
    {
        Ok(resp) => match resp
            .into_inner()
            .next()
            .await
            .map(|r| r.map(|r| r.message_response))
        {
            Some(Ok(Some(MessageResponse::FileDescriptorResponse(f)))) => f.file_descriptor_proto,
            other => panic!("unexpected reflection answer for {symbol}: {other:?}"),
        },
        Err(s) if s.code() == Code::Unimplemented => {
            use v1alpha::server_reflection_request::MessageRequest as Alpha;
            use v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
            let req = v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(Alpha::FileContainingSymbol(symbol.into())),
            };
            let resp = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter([req]))
                .await
                .expect("grpc.reflection.v1alpha FileContainingSymbol");
            match resp
                .into_inner()
                .next()
                .await
                .map(|r| r.map(|r| r.message_response))
            {
                Some(Ok(Some(AlphaResponse::FileDescriptorResponse(f)))) => f.file_descriptor_proto,
                other => panic!("unexpected reflection answer for {symbol}: {other:?}"),
            }
        }
        Err(s) => panic!("grpc.reflection.v1 FileContainingSymbol {symbol}: {s}"),
    }
}
