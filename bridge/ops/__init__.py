"""Operations: metrics, logging, tracing, worker processes, the embedded broker, schemas and record tools."""
