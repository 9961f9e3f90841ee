"""Data in: alphabets, records, structures, residue graphs, the synthetic set, Parquet shards, batch plans and
collation, and building shard sets (`build`). Pure Python / numpy / pyarrow: no Ray, torch only inside `collate`."""
