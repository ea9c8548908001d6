//! The gRPC wire as a hostile peer sends it: any bytes decoded as each message a controller or a node
//! receives, then converted to domain types. A bad message must be an error, never a panic.

#![no_main]

use contract::{
    convert,
    model::{
        BackendLoad, BackendRef, Deregistration, FrontendStatus, HelloAnswer, NodeHello, NodeReport, RegisterReply,
        RegistrationRequest, RoutingDelta, RoutingSnapshot,
    },
    v1,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 8 {
        // What a node receives.
        0 => {
            if let Ok(message) = v1::ControllerMessage::decode(bytes) {
                match message.msg {
                    Some(v1::controller_message::Msg::Snapshot(snapshot)) => {
                        if let Ok(snapshot) = RoutingSnapshot::try_from(snapshot) {
                            // What converts in converts back out and in again to the same value.
                            let again = RoutingSnapshot::try_from(v1::Snapshot::from(&snapshot));
                            assert_eq!(again.as_ref(), Ok(&snapshot));
                        }
                    }
                    Some(v1::controller_message::Msg::Delta(delta)) => {
                        if let Ok(delta) = RoutingDelta::try_from(delta) {
                            let again = RoutingDelta::try_from(v1::SnapshotDelta::from(&delta));
                            assert_eq!(again.as_ref(), Ok(&delta));
                            // Applied to the state it names as its base, and refused by any other.
                            let base = RoutingSnapshot { version: delta.base_version, ..Default::default() };
                            assert!(base.with_delta(delta.clone()).is_some());
                            let other = RoutingSnapshot { version: delta.base_version.wrapping_add(1), ..Default::default() };
                            assert!(other.with_delta(delta).is_none());
                        }
                    }
                    Some(v1::controller_message::Msg::ClusterLoad(load)) => {
                        let _ = convert::cluster_load(&load);
                    }
                    None => {}
                }
            }
        }
        // What the controller receives from a node.
        1 => {
            if let Ok(message) = v1::NodeMessage::decode(bytes) {
                match message.msg {
                    Some(v1::node_message::Msg::Hello(hello)) => {
                        let _ = NodeHello::try_from(&hello);
                    }
                    Some(v1::node_message::Msg::Ack(ack)) => {
                        if let Ok(report) = NodeReport::try_from(ack) {
                            let _ = v1::NodeMessage::from(&report);
                        }
                    }
                    Some(v1::node_message::Msg::Load(load)) => {
                        let _ = NodeReport::try_from(load);
                    }
                    None => {}
                }
            }
        }
        // What the controller receives from a registering client.
        2 => {
            if let Ok(registration) = v1::Registration::decode(bytes)
                && let Ok(request) = RegistrationRequest::try_from(&registration)
            {
                let again = RegistrationRequest::try_from(&v1::Registration::from(&request));
                assert_eq!(again, Ok(request));
            }
        }
        3 => {
            if let Ok(request) = v1::DeregisterRequest::decode(bytes) {
                let _ = Deregistration::try_from(&request);
            }
        }
        4 => {
            if let Ok(ack) = v1::HelloAck::decode(bytes) {
                let _ = HelloAnswer::from(&ack);
            }
        }
        // What an agent receives.
        5 => {
            if let Ok(ack) = v1::RegisterAck::decode(bytes) {
                let _ = RegisterReply::try_from(&ack);
            }
        }
        // What an operator sends.
        6 => {
            if let Ok(request) = v1::SetWeightRequest::decode(bytes) {
                let _ = BackendRef::try_from(request.backend.as_ref());
                let _ = convert::weight(request.weight);
            }
        }
        _ => {
            if let Ok(result) = v1::FrontendResult::decode(bytes) {
                let _ = FrontendStatus::try_from(&result);
            }
            if let Ok(load) = v1::BackendLoad::decode(bytes) {
                let _ = BackendLoad::try_from(&load);
            }
        }
    }
});
