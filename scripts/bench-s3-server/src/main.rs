//! `bench-s3-server ROOT HOST:PORT ACCESS_KEY SECRET_KEY`: an S3 endpoint over `ROOT`
//! (one directory per bucket) for `scripts/bench-receiver`. Prints `ready` once listening.
//!
//! The `s3s-fs` library does the S3 work; two things of its published binary would bound
//! every figure instead of the client under test, so they are done differently here:
//! - TCP_NODELAY: without it the last segment of each response waits ~40 ms for the
//!   client's delayed ACK (1024 GETs in series: 42 s; with it: 5 s).
//! - GetObject reads the object (or its range) in one read: `s3s-fs` streams it in 4 KiB
//!   reads, each a round trip through tokio's blocking pool, which cost the server ~3 CPU
//!   seconds per GiB on a 2-core machine it shares with the receiver.
use std::io::Write;
use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use s3s_fs::FileSystem;
use tokio::net::TcpListener;

struct BenchStore {
    fs: FileSystem,
    root: PathBuf,
}

// The S3 trait with these operations forwarded to s3s-fs, plus the items given after `;`
// (whole impl from the macro: `async_trait` must see the expanded methods).
macro_rules! s3_impl {
    ($($name:ident: $input:ty => $output:ty),* $(,)?; $($extra:item)*) => {
        #[async_trait::async_trait]
        impl S3 for BenchStore {
            $(
                async fn $name(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.fs.$name(req).await
                }
            )*
            $($extra)*
        }
    };
}

s3_impl! {
        create_bucket: CreateBucketInput => CreateBucketOutput,
        head_bucket: HeadBucketInput => HeadBucketOutput,
        list_buckets: ListBucketsInput => ListBucketsOutput,
        head_object: HeadObjectInput => HeadObjectOutput,
        put_object: PutObjectInput => PutObjectOutput,
        delete_object: DeleteObjectInput => DeleteObjectOutput,
        delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
        list_objects: ListObjectsInput => ListObjectsOutput,
        list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
        create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
        upload_part: UploadPartInput => UploadPartOutput,
        complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
        abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
        list_parts: ListPartsInput => ListPartsOutput;

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let path = self.root.join(&req.input.bucket).join(&req.input.key);
        let range = req.input.range;
        // Headers, checks and errors from s3s-fs; its lazy body stream is replaced unread.
        let mut resp = self.fs.get_object(req).await?;
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(|e| s3_error!(e, InternalError))?
            .map_err(|e| s3_error!(e, NoSuchKey))?;
        let bytes = bytes::Bytes::from(bytes);
        let bytes = match range {
            None => bytes,
            Some(r) => {
                let r = r.check(bytes.len() as u64).map_err(|_| s3_error!(InvalidRange))?;
                bytes.slice(r.start as usize..r.end as usize)
            }
        };
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
        resp.output.body = Some(StreamingBlob::wrap(body));
        Ok(resp)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, addr, access, secret] = args.as_slice() else {
        return Err("usage: bench-s3-server ROOT HOST:PORT ACCESS_KEY SECRET_KEY".into());
    };
    let fs = FileSystem::new(root).map_err(|e| format!("{root}: {e:?}"))?;
    let root = std::fs::canonicalize(root)?;
    let mut builder = S3ServiceBuilder::new(BenchStore { fs, root });
    builder.set_auth(SimpleAuth::from_single(access.as_str(), secret.as_str()));
    let service = builder.build();
    let listener = TcpListener::bind(addr.as_str()).await?;
    println!("ready");
    std::io::stdout().flush()?;
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let service = service.clone();
        tokio::spawn(async move {
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}
