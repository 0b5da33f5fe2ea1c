"""What `loraplex prepare` makes and what checks a served adapter: the demo model and adapters (`assets`), the demo
adapters' data and training (`data`, `training`), and the transformers + PEFT reference (`reference`)."""
