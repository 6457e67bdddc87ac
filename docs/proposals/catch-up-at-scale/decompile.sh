#!/bin/sh
# Writes run/MODULE.erl from the installed RabbitMQ 3.10.8 beams' debug info (the source facts
# the study cites: rabbit_stream_queue, rabbit_stream_reader, osiris_log, osiris_writer).
mkdir -p run
for m in rabbit_stream_queue rabbit_stream_reader osiris_log osiris_writer osiris; do
  b=$(find /usr/lib/rabbitmq -name "$m.beam" | head -1)
  erl -noshell -eval '{ok,{_,[{abstract_code,{raw_abstract_v1,F}}]}} = beam_lib:chunks("'"$b"'", [abstract_code]), io:format("~s~n",[erl_prettypr:format(erl_syntax:form_list(F))]), halt().' > "run/$m.erl"
done
