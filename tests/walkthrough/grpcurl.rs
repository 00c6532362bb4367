//! A stand-in for grpcurl: the part of its command line that `dev`'s walk-through uses
//! (`-plaintext`, `-cacert`/`-cert`/`-key`/`-authority`, `-H`, `-d`; `list`, `describe`, unary
//! calls), over the server's reflection (v1), printing and exiting as grpcurl does: the
//! response as JSON; on an error status `ERROR:` with `Code:`, `Message:` and the
//! `google.rpc.ErrorInfo` detail (compact JSON, metadata included, as grpcurl 1.8.6 prints
//! it), and exit code 64 + the status code.

use std::{str::FromStr, time::Duration};

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{MetadataKey, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Status,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};
use tonic_types::StatusExt as _;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs grpcurl with `args` (without the program name); returns the exit code.
pub fn main(args: Vec<String>) -> i32 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

#[derive(Default)]
struct Options {
    plaintext: bool,
    headers: Vec<(String, String)>,
    data: Option<String>,
    cacert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    authority: Option<String>,
    positional: Vec<String>,
}

fn parse(args: Vec<String>) -> Result<Options, Error> {
    let mut o = Options::default();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "-plaintext" => o.plaintext = true,
            "-H" => {
                let h = value("-H")?;
                let (k, v) = h.split_once(':').ok_or("-H wants 'name: value'")?;
                o.headers
                    .push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
            "-d" => o.data = Some(value("-d")?),
            "-cacert" => o.cacert = Some(value("-cacert")?),
            "-cert" => o.cert = Some(value("-cert")?),
            "-key" => o.key = Some(value("-key")?),
            "-authority" => o.authority = Some(value("-authority")?),
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}").into()),
            _ => o.positional.push(a),
        }
    }
    Ok(o)
}

async fn connect(o: &Options, addr: &str) -> Result<Channel, Error> {
    let endpoint = if o.plaintext {
        Endpoint::from_shared(format!("http://{addr}"))?
    } else {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &o.cacert {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&o.cert, &o.key) {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ));
        }
        if let Some(a) = &o.authority {
            tls = tls.domain_name(a.clone());
        }
        Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?
    };
    let endpoint = endpoint.connect_timeout(Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .map_err(|e| format!("Failed to dial target host \"{addr}\": {e}").into())
}

/// One reflection request, one answer.
async fn reflect(channel: &Channel, request: MessageRequest) -> Result<MessageResponse, Error> {
    let mut client = ServerReflectionClient::new(channel.clone());
    let mut answers = client
        .server_reflection_info(tokio_stream::once(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }))
        .await?
        .into_inner();
    let answer = answers.message().await?.ok_or("reflection: no answer")?;
    match answer.message_response.ok_or("reflection: empty answer")? {
        MessageResponse::ErrorResponse(e) => {
            Err(format!("reflection: {} {}", e.error_code, e.error_message).into())
        }
        other => Ok(other),
    }
}

/// The descriptors of the file defining `symbol`, with everything it imports.
async fn pool_for(channel: &Channel, symbol: &str) -> Result<DescriptorPool, Error> {
    let mut files = std::collections::BTreeMap::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
    while let Some(request) = wanted.pop() {
        let MessageResponse::FileDescriptorResponse(found) = reflect(channel, request).await?
        else {
            return Err("reflection: unexpected answer".into());
        };
        for bytes in found.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice())?;
            files.insert(file.name().to_owned(), file);
        }
        for file in files.values() {
            for dep in &file.dependency {
                if !files.contains_key(dep)
                    && !wanted
                        .iter()
                        .any(|w| matches!(w, MessageRequest::FileByFilename(f) if f == dep))
                {
                    wanted.push(MessageRequest::FileByFilename(dep.clone()));
                }
            }
        }
    }
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files.into_values())?;
    Ok(pool)
}

async fn run(args: Vec<String>) -> Result<i32, Error> {
    let o = parse(args)?;
    let [addr, what, rest @ ..] = o.positional.as_slice() else {
        return Err(
            "usage: grpcurl [flags] address (list | describe symbol | service/method)".into(),
        );
    };
    let channel = connect(&o, addr).await?;
    // tonic connects lazily past TCP and TLS: a refused handshake (no client certificate,
    // say) shows on the first call. grpcurl dials eagerly and reports it as a dial failure.
    let dial_failure = |e: Error| -> Error {
        match e.downcast_ref::<Status>() {
            Some(s)
                if std::error::Error::source(s)
                    .is_some_and(|c| c.is::<tonic::transport::Error>()) =>
            {
                format!("Failed to dial target host \"{addr}\": {s}").into()
            }
            _ => e,
        }
    };
    dispatch(&o, channel, what, rest)
        .await
        .map_err(dial_failure)
}

async fn dispatch(
    o: &Options,
    channel: Channel,
    what: &str,
    rest: &[String],
) -> Result<i32, Error> {
    match what {
        "list" => {
            let MessageResponse::ListServicesResponse(list) =
                reflect(&channel, MessageRequest::ListServices(String::new())).await?
            else {
                return Err("reflection: unexpected answer".into());
            };
            let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            for n in names {
                println!("{n}");
            }
            Ok(0)
        }
        "describe" => {
            let symbol = rest.first().ok_or("describe needs a symbol")?;
            let pool = pool_for(&channel, symbol).await?;
            let service = pool
                .get_service_by_name(symbol)
                .ok_or_else(|| format!("{symbol} is not a service"))?;
            println!("{symbol} is a service:");
            println!("service {} {{", service.name());
            for m in service.methods() {
                println!(
                    "  rpc {} ( .{} ) returns ( .{} );",
                    m.name(),
                    m.input().full_name(),
                    m.output().full_name()
                );
            }
            println!("}}");
            Ok(0)
        }
        method => call(o, channel, method).await,
    }
}

async fn call(o: &Options, channel: Channel, method: &str) -> Result<i32, Error> {
    let (service, name) = method
        .rsplit_once('/')
        .ok_or("a method is service/method")?;
    let pool = pool_for(&channel, service).await?;
    let method = pool
        .get_service_by_name(service)
        .ok_or_else(|| format!("no service {service}"))?
        .methods()
        .find(|m| m.name() == name)
        .ok_or_else(|| format!("no method {name} in {service}"))?;
    let data = o.data.as_deref().unwrap_or("{}");
    let mut de = serde_json::Deserializer::from_str(data);
    let input = DynamicMessage::deserialize(method.input(), &mut de)?;
    de.end()?;
    let mut request = tonic::Request::new(input);
    for (k, v) in &o.headers {
        request
            .metadata_mut()
            .insert(MetadataKey::from_str(k)?, MetadataValue::from_str(v)?);
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_str(&format!("/{service}/{name}"))?;
    match grpc
        .unary(request, path, DynamicCodec(method.output()))
        .await
    {
        Ok(response) => {
            println!("{}", serde_json::to_string_pretty(response.get_ref())?);
            Ok(0)
        }
        Err(status) => {
            eprintln!("ERROR:");
            eprintln!("  Code: {:?}", status.code());
            eprintln!("  Message: {}", status.message());
            if let Some(info) = status.get_details_error_info() {
                // As grpcurl 1.8: the detail as compact JSON, keys in order.
                let mut detail = serde_json::json!({
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": info.reason,
                    "domain": info.domain,
                });
                if !info.metadata.is_empty() {
                    detail["metadata"] = serde_json::json!(info.metadata);
                }
                eprintln!("  Details:");
                eprintln!("  1)\t{detail}");
            }
            Ok(64 + status.code() as i32)
        }
    }
}

/// Encodes dynamic requests; decodes responses of one message type.
struct DynamicCodec(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder(self.0.clone())
    }
}

struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encode: {e}")))
    }
}

struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("decode: {e}")))
    }
}
