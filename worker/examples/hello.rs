//! The smallest useful worker: one handler that greets whoever the payload
//! names. Run a coordinator, then `cargo run -p stagecoach-worker --example
//! hello`, and create a migration whose plan has a task of kind `hello`.

use serde_json::json;
use stagecoach_worker::{TaskContext, TaskError, TaskOutput, Worker};

async fn hello(ctx: TaskContext) -> Result<TaskOutput, TaskError> {
    let name = ctx.payload()["name"].as_str().unwrap_or("world");
    if name.is_empty() {
        return Err(TaskError::fatal("\"name\" must not be empty"));
    }
    Ok(TaskOutput::new(
        json!({ "greeting": format!("hello, {name}"), "subject": ctx.subject() }),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let worker = Worker::builder()
        .coordinator("http://127.0.0.1:50051")
        .slots(2)
        .handler("hello", hello)
        .build()?;
    worker
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
