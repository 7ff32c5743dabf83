use clap::Parser;
use gateway::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
    if let Err(e) = config.load_secret_files().and_then(|()| config.validate()) {
        eprintln!("gateway: {e}");
        std::process::exit(2);
    }
    let telemetry = match gateway::telemetry::init(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let internal = match config.internal_listen {
        Some(at) => Some(tokio::net::TcpListener::bind(at).await?),
        None => None,
    };
    if let Some(internal) = &internal {
        // Before `listening on`: whoever waits for that line may use both right away.
        tracing::info!("internal listener on {}", internal.local_addr()?);
    }
    tracing::info!("listening on {}", listener.local_addr()?);
    let node = match gateway::build_node(config).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    tracing::info!(
        node = %node.name,
        mode = if node.config.redis_url.is_some() { "redis" } else { "embedded" },
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
