from featx.cli import app

app(prog_name="featx")
