"""`reprise api`: the HTTP front door (FastAPI on uvicorn). Stateless: keys, tenants, jobs, rate counters and
webhook deliveries all live in Redis, so any number of replicas can run behind a load balancer."""
