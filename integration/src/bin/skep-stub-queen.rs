//! `skep-stub-queen`: a bare tonic `Jobs` service that answers every Submit at once (accepted, one token, done), the throughput baseline.
//!
//! It does no authentication, admission, persistence or dispatch: the same load generator run
//! against it measures what tonic, HTTP/2 on loopback and the generator itself can carry on this
//! machine, so skep's throughput can be read as a share of that ceiling.
//!
//!   skep-stub-queen --addr-file FILE    (listens on 127.0.0.1:0 and writes the address there)

use std::path::PathBuf;
use std::pin::Pin;

use clap::Parser;
use skep_proto::v1::jobs_server::{Jobs, JobsServer};
use skep_proto::v1::{
    Accepted, CancelJobRequest, CancelJobResponse, Done, GetJobRequest, Job, JobEvent,
    ListJobsRequest, ListJobsResponse, SubmitRequest, Token, job_event,
};
use tonic::{Request, Response, Status};

#[derive(Parser, Debug)]
struct Args {
    /// Where to write the bound address once listening.
    #[arg(long)]
    addr_file: PathBuf,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Stub;

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for Stub {
    type SubmitStream = EventStream;

    async fn submit(
        &self,
        req: Request<SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let req = req.into_inner();
        let ev = |kind| {
            Ok(JobEvent {
                job_id: "stub".into(),
                kind: Some(kind),
            })
        };
        let events = vec![
            ev(job_event::Kind::Accepted(Accepted {
                deadline_ms: req.deadline_ms,
                ..Accepted::default()
            })),
            ev(job_event::Kind::Token(Token {
                index: 0,
                text: "stub".into(),
            })),
            ev(job_event::Kind::Done(Done {
                tokens: 1,
                timings: None,
                ..Default::default()
            })),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn get(&self, _: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn cancel(
        &self,
        _: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn list(
        &self,
        _: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        std::fs::write(&args.addr_file, listener.local_addr()?.to_string())?;
        tonic::transport::Server::builder()
            .add_service(JobsServer::new(Stub))
            .serve_with_incoming(skep_common::daemon::incoming(listener))
            .await?;
        Ok(())
    })
}
