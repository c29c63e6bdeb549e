# One image for every process: web, worker, beat, migrate, flower (and the dev-profile sandbox).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY billing ./billing
COPY workers ./workers
COPY sandbox ./sandbox
COPY migrations ./migrations
RUN pip install '.[ops]' \
    && useradd --system --uid 10001 --home-dir /app billing

USER billing
EXPOSE 8000
CMD ["billing", "web", "--host", "0.0.0.0", "--port", "8000"]
