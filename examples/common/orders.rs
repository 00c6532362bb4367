//! The `examples.orders.v1.Orders` service shared by the `in_process` and `delegated` examples
//! (and by the tests): handlers that read the caller's identity, the policy that protects
//! them, and a router with reflection.
#![allow(dead_code)]

use std::{pin::Pin, time::Duration};

use clerk_grpc_auth::{
    authz::{
        policy::{Policy, Rule},
        Check,
    },
    layer::{AuthLayer, RequestIdentity},
    Identity,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Generated code for `examples.orders.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("examples.orders.v1");

    /// Descriptor set for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/orders_descriptor.bin"));
}

use pb::orders_server::{Orders, OrdersServer};

/// The permission `DeleteOrder` requires.
pub const DELETE_PERMISSION: &str = "org:orders:delete";

/// `Ping` public, `ListOrders` and `WatchOrders` for any signed-in user, `DeleteOrder` with
/// the `org:orders:delete` permission. Everything else (unknown methods) authenticated.
pub fn policy() -> Policy {
    let policy = Policy::authenticated()
        .method("/examples.orders.v1.Orders/Ping", Rule::public())
        .method(
            "/examples.orders.v1.Orders/DeleteOrder",
            Rule::authenticated().require(Check::permission(DELETE_PERMISSION)),
        );
    // Every rule names a method the server serves: a typo is an error here, not a rule
    // that never applies.
    if let Err(e) = policy.check_against(&[pb::FILE_DESCRIPTOR_SET]) {
        panic!("{e}");
    }
    policy
}

/// The handlers.
#[derive(Debug, Default, Clone)]
pub struct OrdersService;

fn caller(id: &Identity) -> pb::Caller {
    let org = id.organization.as_ref();
    pb::Caller {
        user_id: id.user_id.clone(),
        org_id: org.map(|o| o.id.clone()).unwrap_or_default(),
        org_role: org.and_then(|o| o.role.clone()).unwrap_or_default(),
        session_id: id.session_id.clone().unwrap_or_default(),
        machine_id: id
            .machine
            .as_ref()
            .map(|m| m.machine_id.clone().unwrap_or_else(|| m.subject.clone()))
            .unwrap_or_default(),
        token_type: id.token_type.as_str_name().to_owned(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::OrderEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Orders for OrdersService {
    async fn ping(
        &self,
        _: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {
            message: "pong".into(),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let id = request.identity()?;
        let scope = id
            .organization
            .as_ref()
            .map_or_else(|| id.user_id.clone(), |o| o.id.clone());
        Ok(Response::new(pb::ListOrdersResponse {
            caller: Some(caller(id)),
            orders: vec![pb::Order {
                id: "ord_1".into(),
                description: format!("first order of {scope}"),
            }],
        }))
    }

    async fn delete_order(
        &self,
        request: Request<pb::DeleteOrderRequest>,
    ) -> Result<Response<pb::DeleteOrderResponse>, Status> {
        let id = request.identity()?;
        let caller = caller(id);
        let order_id = request.into_inner().order_id;
        if order_id.is_empty() {
            return Err(Status::invalid_argument("order_id is empty"));
        }
        Ok(Response::new(pb::DeleteOrderResponse {
            caller: Some(caller),
            deleted_order_id: order_id,
        }))
    }

    type WatchOrdersStream = EventStream;

    async fn watch_orders(
        &self,
        request: Request<pb::WatchOrdersRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = caller(request.identity()?);
        let req = request.into_inner();
        let interval = match req.interval_ms {
            0 => 1000,
            ms @ 1..=60_000 => ms,
            _ => return Err(Status::invalid_argument("interval_ms must be 1..=60000")),
        };
        if req.answer_after_ms > 60_000 {
            return Err(Status::invalid_argument(
                "answer_after_ms must be 0..=60000",
            ));
        }
        // A slow handler: it answers late, the stream still ends when the token does.
        tokio::time::sleep(Duration::from_millis(u64::from(req.answer_after_ms))).await;
        if req.burst {
            // Always ready: the next event never waits.
            let events = tokio_stream::iter((1..).map(move |seq| {
                Ok(pb::OrderEvent {
                    caller: Some(caller.clone()),
                    seq,
                })
            }));
            return Ok(Response::new(Box::pin(events)));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(u64::from(interval)));
            for seq in 1.. {
                tick.tick().await;
                let event = pb::OrderEvent {
                    caller: Some(caller.clone()),
                    seq,
                };
                if tx.send(Ok(event)).await.is_err() {
                    break; // the client went away, or the layer ended the stream
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn place_orders(
        &self,
        request: Request<tonic::Streaming<pb::Order>>,
    ) -> Result<Response<pb::PlaceOrdersResponse>, Status> {
        let caller = caller(request.identity()?);
        let mut orders = request.into_inner();
        let mut received = 0;
        // Until the client ends the stream — or the layer does (its status is returned).
        while orders.message().await?.is_some() {
            received += 1;
        }
        Ok(Response::new(pb::PlaceOrdersResponse {
            caller: Some(caller),
            received,
        }))
    }
}

/// The Orders service, reflection (v1 and v1alpha) and health, all behind `layer`, served on
/// `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    layer: AuthLayer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("descriptor set");
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<OrdersServer<OrdersService>>().await;
    tonic::transport::Server::builder()
        .layer(layer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(OrdersServer::new(OrdersService))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
