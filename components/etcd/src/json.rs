//! The JSON of etcd's HTTP gateway, by reflection over etcd's protos (compiled into a
//! descriptor set by `build.rs`).
//!
//! etcd's gateway is grpc-gateway v1 with its default marshaler, `JSONPb{OrigName: true}`
//! (golang/protobuf's jsonpb). So, answers:
//! - fields under their proto names (`range_end`, `create_revision`, `ID`, `dbSize`);
//! - fields holding their default value left out (a oneof member that is set is always
//!   written, zero or not);
//! - 64-bit integers as decimal strings, 32-bit ones as numbers;
//! - bytes in standard base64 with padding;
//! - enums by name (`"EQUAL"`, `"VALUE"`, `"DELETE"`).
//!
//! Requests accept the proto name or the lowerCamel JSON name of a field, 64-bit integers as
//! strings or numbers, enums by name or number, base64 standard or URL-safe, padded or not; an
//! empty body is the empty message. Unknown fields are ignored (grpc-gateway's default); an enum
//! name that is not one is refused.

use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};
use serde_json::Value;
use std::sync::LazyLock;

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(
        include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor.bin")).as_ref(),
    )
    .expect("the etcd descriptor set compiled by build.rs decodes")
});

const SERIALIZE: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .stringify_64_bit_integers(true)
    .use_enum_numbers(false)
    .skip_default_fields(true);

/// A prost message of etcd's API with its full proto name.
pub trait JsonMessage: prost::Message + Default + Sized {
    /// `package.Message`, as in the `.proto` file.
    const NAME: &'static str;
}

macro_rules! json_messages {
    ($($pkg:ident :: $t:ident => $name:literal,)*) => {
        $(
            impl JsonMessage for atoll_proto::$pkg::$t {
                const NAME: &'static str = $name;
            }
        )*

        #[cfg(test)]
        const ALL_NAMES: &[&str] = &[$($name,)*];
    };
}

json_messages! {
    mvccpb::KeyValue => "mvccpb.KeyValue",
    mvccpb::Event => "mvccpb.Event",
    etcdserverpb::ResponseHeader => "etcdserverpb.ResponseHeader",
    etcdserverpb::RangeRequest => "etcdserverpb.RangeRequest",
    etcdserverpb::RangeResponse => "etcdserverpb.RangeResponse",
    etcdserverpb::PutRequest => "etcdserverpb.PutRequest",
    etcdserverpb::PutResponse => "etcdserverpb.PutResponse",
    etcdserverpb::DeleteRangeRequest => "etcdserverpb.DeleteRangeRequest",
    etcdserverpb::DeleteRangeResponse => "etcdserverpb.DeleteRangeResponse",
    etcdserverpb::TxnRequest => "etcdserverpb.TxnRequest",
    etcdserverpb::TxnResponse => "etcdserverpb.TxnResponse",
    etcdserverpb::CompactionRequest => "etcdserverpb.CompactionRequest",
    etcdserverpb::CompactionResponse => "etcdserverpb.CompactionResponse",
    etcdserverpb::LeaseGrantRequest => "etcdserverpb.LeaseGrantRequest",
    etcdserverpb::LeaseGrantResponse => "etcdserverpb.LeaseGrantResponse",
    etcdserverpb::LeaseRevokeRequest => "etcdserverpb.LeaseRevokeRequest",
    etcdserverpb::LeaseRevokeResponse => "etcdserverpb.LeaseRevokeResponse",
    etcdserverpb::LeaseKeepAliveRequest => "etcdserverpb.LeaseKeepAliveRequest",
    etcdserverpb::LeaseKeepAliveResponse => "etcdserverpb.LeaseKeepAliveResponse",
    etcdserverpb::LeaseTimeToLiveRequest => "etcdserverpb.LeaseTimeToLiveRequest",
    etcdserverpb::LeaseTimeToLiveResponse => "etcdserverpb.LeaseTimeToLiveResponse",
    etcdserverpb::LeaseLeasesRequest => "etcdserverpb.LeaseLeasesRequest",
    etcdserverpb::LeaseLeasesResponse => "etcdserverpb.LeaseLeasesResponse",
    etcdserverpb::MemberAddRequest => "etcdserverpb.MemberAddRequest",
    etcdserverpb::MemberAddResponse => "etcdserverpb.MemberAddResponse",
    etcdserverpb::MemberRemoveRequest => "etcdserverpb.MemberRemoveRequest",
    etcdserverpb::MemberRemoveResponse => "etcdserverpb.MemberRemoveResponse",
    etcdserverpb::MemberUpdateRequest => "etcdserverpb.MemberUpdateRequest",
    etcdserverpb::MemberUpdateResponse => "etcdserverpb.MemberUpdateResponse",
    etcdserverpb::MemberListRequest => "etcdserverpb.MemberListRequest",
    etcdserverpb::MemberListResponse => "etcdserverpb.MemberListResponse",
    etcdserverpb::MemberPromoteRequest => "etcdserverpb.MemberPromoteRequest",
    etcdserverpb::MemberPromoteResponse => "etcdserverpb.MemberPromoteResponse",
    etcdserverpb::AlarmRequest => "etcdserverpb.AlarmRequest",
    etcdserverpb::AlarmResponse => "etcdserverpb.AlarmResponse",
    etcdserverpb::StatusRequest => "etcdserverpb.StatusRequest",
    etcdserverpb::StatusResponse => "etcdserverpb.StatusResponse",
    etcdserverpb::DefragmentRequest => "etcdserverpb.DefragmentRequest",
    etcdserverpb::DefragmentResponse => "etcdserverpb.DefragmentResponse",
    etcdserverpb::HashRequest => "etcdserverpb.HashRequest",
    etcdserverpb::HashResponse => "etcdserverpb.HashResponse",
    etcdserverpb::HashKvRequest => "etcdserverpb.HashKVRequest",
    etcdserverpb::HashKvResponse => "etcdserverpb.HashKVResponse",
    etcdserverpb::WatchRequest => "etcdserverpb.WatchRequest",
    etcdserverpb::WatchResponse => "etcdserverpb.WatchResponse",
    etcdserverpb::MoveLeaderRequest => "etcdserverpb.MoveLeaderRequest",
    etcdserverpb::MoveLeaderResponse => "etcdserverpb.MoveLeaderResponse",
    etcdserverpb::DowngradeRequest => "etcdserverpb.DowngradeRequest",
    etcdserverpb::DowngradeResponse => "etcdserverpb.DowngradeResponse",
    v3electionpb::CampaignRequest => "v3electionpb.CampaignRequest",
    v3electionpb::CampaignResponse => "v3electionpb.CampaignResponse",
    v3electionpb::LeaderKey => "v3electionpb.LeaderKey",
    v3electionpb::LeaderRequest => "v3electionpb.LeaderRequest",
    v3electionpb::LeaderResponse => "v3electionpb.LeaderResponse",
    v3electionpb::ResignRequest => "v3electionpb.ResignRequest",
    v3electionpb::ResignResponse => "v3electionpb.ResignResponse",
    v3electionpb::ProclaimRequest => "v3electionpb.ProclaimRequest",
    v3electionpb::ProclaimResponse => "v3electionpb.ProclaimResponse",
    v3lockpb::LockRequest => "v3lockpb.LockRequest",
    v3lockpb::LockResponse => "v3lockpb.LockResponse",
    v3lockpb::UnlockRequest => "v3lockpb.UnlockRequest",
    v3lockpb::UnlockResponse => "v3lockpb.UnlockResponse",
    etcdserverpb::AuthEnableRequest => "etcdserverpb.AuthEnableRequest",
    etcdserverpb::AuthEnableResponse => "etcdserverpb.AuthEnableResponse",
    etcdserverpb::AuthDisableRequest => "etcdserverpb.AuthDisableRequest",
    etcdserverpb::AuthDisableResponse => "etcdserverpb.AuthDisableResponse",
    etcdserverpb::AuthStatusRequest => "etcdserverpb.AuthStatusRequest",
    etcdserverpb::AuthStatusResponse => "etcdserverpb.AuthStatusResponse",
    etcdserverpb::AuthenticateRequest => "etcdserverpb.AuthenticateRequest",
    etcdserverpb::AuthenticateResponse => "etcdserverpb.AuthenticateResponse",
    etcdserverpb::AuthUserAddRequest => "etcdserverpb.AuthUserAddRequest",
    etcdserverpb::AuthUserAddResponse => "etcdserverpb.AuthUserAddResponse",
    etcdserverpb::AuthUserGetRequest => "etcdserverpb.AuthUserGetRequest",
    etcdserverpb::AuthUserGetResponse => "etcdserverpb.AuthUserGetResponse",
    etcdserverpb::AuthUserListRequest => "etcdserverpb.AuthUserListRequest",
    etcdserverpb::AuthUserListResponse => "etcdserverpb.AuthUserListResponse",
    etcdserverpb::AuthUserDeleteRequest => "etcdserverpb.AuthUserDeleteRequest",
    etcdserverpb::AuthUserDeleteResponse => "etcdserverpb.AuthUserDeleteResponse",
    etcdserverpb::AuthUserChangePasswordRequest => "etcdserverpb.AuthUserChangePasswordRequest",
    etcdserverpb::AuthUserChangePasswordResponse => "etcdserverpb.AuthUserChangePasswordResponse",
    etcdserverpb::AuthUserGrantRoleRequest => "etcdserverpb.AuthUserGrantRoleRequest",
    etcdserverpb::AuthUserGrantRoleResponse => "etcdserverpb.AuthUserGrantRoleResponse",
    etcdserverpb::AuthUserRevokeRoleRequest => "etcdserverpb.AuthUserRevokeRoleRequest",
    etcdserverpb::AuthUserRevokeRoleResponse => "etcdserverpb.AuthUserRevokeRoleResponse",
    etcdserverpb::AuthRoleAddRequest => "etcdserverpb.AuthRoleAddRequest",
    etcdserverpb::AuthRoleAddResponse => "etcdserverpb.AuthRoleAddResponse",
    etcdserverpb::AuthRoleGetRequest => "etcdserverpb.AuthRoleGetRequest",
    etcdserverpb::AuthRoleGetResponse => "etcdserverpb.AuthRoleGetResponse",
    etcdserverpb::AuthRoleListRequest => "etcdserverpb.AuthRoleListRequest",
    etcdserverpb::AuthRoleListResponse => "etcdserverpb.AuthRoleListResponse",
    etcdserverpb::AuthRoleDeleteRequest => "etcdserverpb.AuthRoleDeleteRequest",
    etcdserverpb::AuthRoleDeleteResponse => "etcdserverpb.AuthRoleDeleteResponse",
    etcdserverpb::AuthRoleGrantPermissionRequest => "etcdserverpb.AuthRoleGrantPermissionRequest",
    etcdserverpb::AuthRoleGrantPermissionResponse => "etcdserverpb.AuthRoleGrantPermissionResponse",
    etcdserverpb::AuthRoleRevokePermissionRequest => "etcdserverpb.AuthRoleRevokePermissionRequest",
    etcdserverpb::AuthRoleRevokePermissionResponse => "etcdserverpb.AuthRoleRevokePermissionResponse",
}

/// Why a body could not be read or a message written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError(pub String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

fn descriptor(name: &str) -> Result<MessageDescriptor, JsonError> {
    POOL.get_message_by_name(name)
        .ok_or_else(|| JsonError(format!("no descriptor for message {name}")))
}

/// `m` as the gateway writes it.
pub fn to_json<M: JsonMessage>(m: &M) -> Result<Vec<u8>, JsonError> {
    let desc = descriptor(M::NAME)?;
    let dynamic = DynamicMessage::decode(desc, m.encode_to_vec().as_slice())
        .map_err(|e| JsonError(format!("{}: {e}", M::NAME)))?;
    let mut out = serde_json::Serializer::new(Vec::with_capacity(128));
    dynamic
        .serialize_with_options(&mut out, &SERIALIZE)
        .map_err(|e| JsonError(format!("{}: {e}", M::NAME)))?;
    Ok(out.into_inner())
}

/// A request body as the gateway reads it.
pub fn from_json<M: JsonMessage>(body: &[u8]) -> Result<M, JsonError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(M::default());
    }
    let desc = descriptor(M::NAME)?;
    let mut value: Value = serde_json::from_slice(body).map_err(|e| JsonError(e.to_string()))?;
    if value.is_null() {
        return Ok(M::default());
    }
    drop_unknown_fields(&mut value, &desc);
    let dynamic = DynamicMessage::deserialize_with_options(desc, value, &DeserializeOptions::new())
        .map_err(|e| JsonError(e.to_string()))?;
    M::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| JsonError(format!("{}: {e}", M::NAME)))
}

fn field_of(desc: &MessageDescriptor, key: &str) -> Option<prost_reflect::FieldDescriptor> {
    desc.get_field_by_json_name(key)
        .or_else(|| desc.get_field_by_name(key))
}

/// Removes, at every depth, the object members that name no field of the message there.
fn drop_unknown_fields(value: &mut Value, desc: &MessageDescriptor) {
    if desc.full_name().starts_with("google.protobuf.") {
        return; // well-known types have JSON forms of their own
    }
    let Value::Object(map) = value else {
        return;
    };
    map.retain(|k, _| field_of(desc, k).is_some());
    for (k, v) in map.iter_mut() {
        let Some(field) = field_of(desc, k) else {
            continue;
        };
        let Kind::Message(inner) = field.kind() else {
            continue;
        };
        if field.is_map() {
            if let (Kind::Message(val_desc), Value::Object(entries)) =
                (inner.map_entry_value_field().kind(), &mut *v)
            {
                for e in entries.values_mut() {
                    drop_unknown_fields(e, &val_desc);
                }
            }
        } else if field.is_list() {
            if let Value::Array(items) = v {
                for item in items {
                    drop_unknown_fields(item, &inner);
                }
            }
        } else {
            drop_unknown_fields(v, &inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_proto::etcdserverpb::{
        compare, request_op, response_op, Compare, DeleteRangeRequest, Member, MemberListResponse,
        PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp,
        StatusResponse, TxnRequest, TxnResponse,
    };
    use atoll_proto::mvccpb::KeyValue;
    use serde_json::json;

    fn value_of<M: JsonMessage>(m: &M) -> Value {
        serde_json::from_slice(&to_json(m).unwrap()).unwrap()
    }

    #[test]
    fn every_listed_message_has_a_descriptor() {
        for name in ALL_NAMES {
            assert!(POOL.get_message_by_name(name).is_some(), "{name}");
        }
    }

    fn sample_txn() -> TxnRequest {
        TxnRequest {
            compare: vec![
                Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Value as i32,
                    key: b"foo".to_vec(),
                    range_end: vec![],
                    target_union: Some(compare::TargetUnion::Value(b"bar".to_vec())),
                },
                Compare {
                    result: compare::CompareResult::Greater as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: b"k\xff\x00".to_vec(),
                    range_end: b"l".to_vec(),
                    target_union: Some(compare::TargetUnion::ModRevision(1 << 60)),
                },
                Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Version as i32,
                    key: b"v".to_vec(),
                    range_end: vec![],
                    // A oneof member set to zero is still written.
                    target_union: Some(compare::TargetUnion::Version(0)),
                },
            ],
            success: vec![
                RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: b"foo".to_vec(),
                        value: b"baz".to_vec(),
                        lease: 7,
                        prev_kv: true,
                        ..Default::default()
                    })),
                },
                RequestOp {
                    request: Some(request_op::Request::RequestTxn(TxnRequest {
                        compare: vec![],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestDeleteRange(
                                DeleteRangeRequest {
                                    key: b"a".to_vec(),
                                    range_end: vec![0],
                                    prev_kv: false,
                                },
                            )),
                        }],
                        failure: vec![],
                    })),
                },
            ],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"foo".to_vec(),
                    limit: 10,
                    revision: -1,
                    sort_order: 2,
                    sort_target: 4,
                    serializable: true,
                    ..Default::default()
                })),
            }],
        }
    }

    #[test]
    fn txn_request_round_trips_with_grpc_gateway_conventions() {
        let txn = sample_txn();
        let v = value_of(&txn);
        assert_eq!(
            v,
            json!({
                "compare": [
                    {"target": "VALUE", "key": "Zm9v", "value": "YmFy"},
                    {"result": "GREATER", "target": "MOD", "key": "a/8A", "range_end": "bA==",
                     "mod_revision": "1152921504606846976"},
                    {"key": "dg==", "version": "0"}
                ],
                "success": [
                    {"request_put": {"key": "Zm9v", "value": "YmF6", "lease": "7", "prev_kv": true}},
                    {"request_txn": {"success": [
                        {"request_delete_range": {"key": "YQ==", "range_end": "AA=="}}
                    ]}}
                ],
                "failure": [
                    {"request_range": {"key": "Zm9v", "limit": "10", "revision": "-1",
                     "sort_order": "DESCEND", "sort_target": "VALUE", "serializable": true}}
                ]
            })
        );
        let back: TxnRequest = from_json(&to_json(&txn).unwrap()).unwrap();
        assert_eq!(back, txn);
    }

    #[test]
    fn requests_accept_camel_case_numbers_and_enum_numbers() {
        let body = br#"{
            "compare": [{"result": 3, "target": "MOD", "key": "Zm9v", "modRevision": 42}],
            "success": [{"requestPut": {"key": "Zm9v", "value": "YmFy", "ignoreValue": false}}],
            "failure": [{"request_range": {"key": "Zm9v", "rangeEnd": "Zm9w", "limit": "5", "keysOnly": true}}]
        }"#;
        let t: TxnRequest = from_json(body).unwrap();
        assert_eq!(t.compare[0].result, compare::CompareResult::NotEqual as i32);
        assert_eq!(t.compare[0].target, compare::CompareTarget::Mod as i32);
        assert_eq!(
            t.compare[0].target_union,
            Some(compare::TargetUnion::ModRevision(42))
        );
        let Some(request_op::Request::RequestPut(p)) = &t.success[0].request else {
            panic!("{t:?}");
        };
        assert_eq!(
            (p.key.as_slice(), p.value.as_slice()),
            (&b"foo"[..], &b"bar"[..])
        );
        let Some(request_op::Request::RequestRange(r)) = &t.failure[0].request else {
            panic!("{t:?}");
        };
        assert_eq!(r.range_end, b"fop");
        assert_eq!(r.limit, 5);
        assert!(r.keys_only);
    }

    #[test]
    fn base64_variants_empty_bodies_and_unknown_fields() {
        // URL-safe and unpadded base64 read as well as the standard form.
        let r: RangeRequest = from_json(br#"{"key": "a_8A", "range_end": "bA"}"#).unwrap();
        assert_eq!(r.key, b"k\xff\x00");
        assert_eq!(r.range_end, b"l");
        assert_eq!(
            from_json::<RangeRequest>(b"").unwrap(),
            RangeRequest::default()
        );
        assert_eq!(
            from_json::<RangeRequest>(b" \n").unwrap(),
            RangeRequest::default()
        );
        assert_eq!(
            from_json::<RangeRequest>(b"null").unwrap(),
            RangeRequest::default()
        );
        assert_eq!(
            from_json::<RangeRequest>(b"{}").unwrap(),
            RangeRequest::default()
        );
        // Unknown fields are ignored, at any depth.
        let t: TxnRequest = from_json(
            br#"{"future": 1, "success": [{"request_put": {"key": "YQ==", "shiny": {"x": 1}}}]}"#,
        )
        .unwrap();
        assert_eq!(t.success.len(), 1);
    }

    #[test]
    fn bad_bodies_are_refused() {
        assert!(from_json::<RangeRequest>(b"{").is_err());
        assert!(from_json::<RangeRequest>(b"[1]").is_err());
        assert!(from_json::<RangeRequest>(br#"{"key": "not base64!"}"#).is_err());
        assert!(from_json::<RangeRequest>(br#"{"limit": "ten"}"#).is_err());
        assert!(from_json::<RangeRequest>(br#"{"sort_order": "SIDEWAYS"}"#).is_err());
        assert!(from_json::<TxnRequest>(br#"{"compare": [{"result": "EQUALS"}]}"#).is_err());
    }

    #[test]
    fn responses_use_proto_names_and_omit_defaults() {
        let header = ResponseHeader {
            cluster_id: u64::MAX,
            member_id: 1,
            revision: 1 << 53,
            raft_term: 0,
        };
        let r = RangeResponse {
            header: Some(header),
            kvs: vec![KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 3,
                version: 1,
                value: b"bar".to_vec(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            value_of(&r),
            json!({
                "header": {"cluster_id": "18446744073709551615", "member_id": "1",
                           "revision": "9007199254740992"},
                "kvs": [{"key": "Zm9v", "create_revision": "2", "mod_revision": "3",
                         "version": "1", "value": "YmFy"}],
                "count": "1"
            })
        );
        let m = MemberListResponse {
            header: None,
            members: vec![Member {
                id: 5,
                name: "store-5".into(),
                peer_ur_ls: vec!["http://127.0.0.1:20160".into()],
                client_ur_ls: vec!["http://127.0.0.1:20160".into()],
                is_learner: false,
            }],
        };
        assert_eq!(
            value_of(&m),
            json!({"members": [{"ID": "5", "name": "store-5",
                "peerURLs": ["http://127.0.0.1:20160"], "clientURLs": ["http://127.0.0.1:20160"]}]})
        );
        let s = StatusResponse {
            version: "3.5.17".into(),
            db_size: 4096,
            leader: 1,
            raft_index: 9,
            raft_term: 2,
            raft_applied_index: 9,
            db_size_in_use: 100,
            ..Default::default()
        };
        assert_eq!(
            value_of(&s),
            json!({"version": "3.5.17", "dbSize": "4096", "leader": "1", "raftIndex": "9",
                   "raftTerm": "2", "raftAppliedIndex": "9", "dbSizeInUse": "100"})
        );
        let t = TxnResponse {
            header: None,
            succeeded: true,
            responses: vec![ResponseOp {
                response: Some(response_op::Response::ResponsePut(Default::default())),
            }],
        };
        assert_eq!(
            value_of(&t),
            json!({"succeeded": true, "responses": [{"response_put": {}}]})
        );
        // The empty message is `{}`.
        assert_eq!(to_json(&StatusResponse::default()).unwrap(), b"{}");
    }

    #[test]
    fn hash_kv_names_differ_from_rust_names() {
        let r: atoll_proto::etcdserverpb::HashKvRequest =
            from_json(br#"{"revision": "12"}"#).unwrap();
        assert_eq!(r.revision, 12);
    }
}
