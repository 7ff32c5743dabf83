use gateway::config::Config;
use history_service::startup;

/// A start-up failure: one line on stderr, exit status 2.
fn fail(what: impl std::fmt::Display) -> ! {
    eprintln!("gateway: {what}");
    std::process::exit(2);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config: Config = startup::parse();
    if let Err(e) = config.load_secret_files().and_then(|()| config.validate()) {
        fail(e);
    }
    let telemetry = gateway::telemetry::init(&config).unwrap_or_else(|e| fail(e));
    let listener = startup::bind(config.listen, "CHAT_LISTEN", "--listen")
        .await
        .unwrap_or_else(|e| fail(e));
    let internal = match config.internal_listen {
        Some(at) => Some(
            startup::bind(at, "CHAT_INTERNAL_LISTEN", "--internal-listen")
                .await
                .unwrap_or_else(|e| fail(e)),
        ),
        None => None,
    };
    if let Some(internal) = &internal {
        // Before `listening on`: whoever waits for that line may use both right away.
        tracing::info!("internal listener on {}", internal.local_addr()?);
    }
    tracing::info!("listening on {}", listener.local_addr()?);
    let node = gateway::build_node(config)
        .await
        .unwrap_or_else(|e| fail(e));
    tracing::info!(
        node = %node.name,
        mode = if node.config.redis.url.is_some() { "redis" } else { "embedded" },
        traces = telemetry.exporting(),
        "started"
    );
    let served =
        gateway::serve_with_internal(listener, internal, node, gateway::shutdown::signal()).await;
    // Sessions' `connect` spans end during the drain: flush after it.
    telemetry.shutdown().await;
    served?;
    Ok(())
}
