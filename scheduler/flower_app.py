"""The app Flower runs with. It declares `reprise.generate` so that Flower's HTTP API
(`POST /api/task/async-apply/reprise.generate`) can enqueue it; the body runs only on workers,
which register the real task from `workers.tasks` in their own process."""

from scheduler.app import GENERATE_TASK, get_app

app = get_app()


@app.task(name=GENERATE_TASK, bind=True)
def generate(self, *args, **kwargs):
    raise RuntimeError(f"{GENERATE_TASK} runs on worker nodes (`reprise worker`), never in the Flower process")
