SERVE = config["serve"]


def serve_flags():
    """api_server flags from config.yaml's serve: section (device: serve.device, else the build's)."""
    s = SERVE
    flags = [
        f"--server-name {s['server_name']}",
        f"--server-port {s['server_port']}",
        f"--cache-max-entry-count {s['cache_max_entry_count']}",
        f"--quant-policy {s['quant_policy']}",
        f"--max-batch-size {s['max_batch_size']}",
    ]
    if s.get("session_len"):
        flags.append(f"--session-len {s['session_len']}")
    if s["enable_prefix_caching"]:
        flags.append("--enable-prefix-caching")
    if s.get("tp", 1) > 1:
        flags.append(f"--tp {s['tp']}")  # tensor parallel over GPUs 0..tp-1 of CUDA_VISIBLE_DEVICES
    device = s["device"] or config["device"]
    if device:
        flags.append(f"--device {device}")
    if s.get("proxy_url"):
        flags.append(f"--proxy-url {s['proxy_url']}")
    return " ".join(flags)


rule serve:
    """Serve the packed artifact with the OpenAI-compatible API in the foreground (Ctrl-C stops it)."""
    input:
        packed=f"results/{MODEL}/packed",  # (not expand(rules.pack.output...): storage-flagged under k8s)
        quality_gate=f"results/{MODEL}/eval/ppl.json",  # serve only what passed the gate
    params:
        flags=serve_flags(),
    log:
        f"logs/{MODEL}/serve.log",
    benchmark:
        f"benchmarks/{MODEL}/serve.tsv"
    shell:
        "lmkiln serve api_server {input.packed} {params.flags} 2>&1 | tee {log}"
