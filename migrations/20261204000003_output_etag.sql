-- Entity tag of each task's uploaded output, checked by the finalizer.
ALTER TABLE tasks ADD COLUMN output_etag text;
