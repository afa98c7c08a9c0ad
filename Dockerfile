# The service image used by docker-compose.yml on hosts that have a Docker engine.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain ./domain
COPY projections ./projections
COPY retention ./retention
COPY service ./service
RUN pip install --no-cache-dir . && useradd --create-home resultsvc \
    && mkdir -p /var/lib/resultsvc && chown resultsvc /var/lib/resultsvc
USER resultsvc
EXPOSE 8000
ENTRYPOINT ["resultsvc"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
